"""Split-and-privatize LoRA (SAP; Shen et al., "A Split-and-Privatize Framework for Large Language
Model Fine-Tuning", arXiv:2312.15603) as a registered algorithm: ``run.algorithm = "sap"``, its
options in ``[algorithm.options]`` (see :class:`~fedtune.sap.options.SAPOptions`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import ClassVar

from fedtune.aggregators.base import Aggregator
from fedtune.algorithms.base import Algorithm
from fedtune.algorithms.registry import register_algorithm
from fedtune.config import RunConfig
from fedtune.sap.client import SAPNode
from fedtune.sap.dp import check_sap_privacy
from fedtune.sap.options import SAPOptions
from fedtune.sap.server import SAPServer


@register_algorithm("sap")
class SplitAndPrivatize(Algorithm):
    """Clients run the frozen bottom and privatize; the server trains the trunk's LoRA over gRPC.

    ``privacy.mechanism = "sample"`` adds label DP to the U-shaped classifier (:mod:`fedtune.sap.dp`).
    """

    privacy_mechanisms: ClassVar[tuple[str, ...]] = ("sample",)

    def __init__(
        self,
        cfg: RunConfig,
        *,
        task: str = "classification",
        depth: int = 0,
        variant: str = "embedding",
        u_shaped: bool = False,
        privatize: bool = True,
        eta: float = 100.0,
        cti: bool = False,
        cti_floor: float = 0.6,
        denoise: str = "none",
        adapters: str = "shared",
        local_steps: int = 10,
        batch_size: int = 16,
        lr: float = 5e-4,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_targets: str = "",
        classes: str = "",
        wire_dtype: str = "float32",
        split_host: str = "127.0.0.1",
        split_port: int = 0,
        advertise_host: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        tls_ca: str = "",
        step_timeout_s: float = 300.0,
        dp_cut_clip: float = 0.0,
    ) -> None:
        super().__init__(cfg)
        # The signature above is what the registry checks [algorithm.options] against; its
        # parameters are exactly SAPOptions' fields, which validate them.
        given = locals()
        self.options = SAPOptions(**{f.name: given[f.name] for f in fields(SAPOptions)})
        check_sap_privacy(cfg, self.options)

    def server(self, aggregator: Aggregator) -> SAPServer:
        return SAPServer(self.cfg, self.options, aggregator)

    def client(self) -> SAPNode:
        return SAPNode(self.cfg, self.options)
