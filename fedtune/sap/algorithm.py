"""Split-and-privatize LoRA (SAP; Shen et al., "A Split-and-Privatize Framework for Large Language
Model Fine-Tuning", arXiv:2312.15603) as a registered algorithm: ``run.algorithm = "sap"``, its
options in ``[algorithm.options]`` (see :class:`~fedtune.sap.options.SAPOptions`).
"""

from __future__ import annotations

from dataclasses import fields

from fedtune.aggregators.base import Aggregator
from fedtune.algorithms.base import Algorithm
from fedtune.algorithms.registry import register_algorithm
from fedtune.config import RunConfig
from fedtune.sap.client import SAPNode
from fedtune.sap.options import SAPOptions
from fedtune.sap.server import SAPServer


@register_algorithm("sap")
class SplitAndPrivatize(Algorithm):
    """Clients run the frozen bottom and privatize; the server trains the trunk's LoRA over gRPC."""

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
    ) -> None:
        super().__init__(cfg)
        if cfg.privacy.enabled:
            # What leaves a SAP client is the privatized embeddings (d_chi-privacy on each token's
            # vector, SAPOptions.eta: metric DP, not (epsilon, delta)) and, U-shaped, the head's weights
            # and each batch's dLoss/d(trunk output) sent up to the server. DP-SGD on the client head
            # would not bound the latter, which depend on every example's label unclipped.
            raise ValueError(
                f"privacy.mechanism = {cfg.privacy.mechanism!r} is not available for run.algorithm = 'sap': "
                "SAP's privacy is its d_chi privatizer ([algorithm.options] privatize = true, eta), a "
                "metric-DP guarantee per token embedding, not an (epsilon, delta) accountant's. "
                "(epsilon, delta)-DP for SAP would need per-example clipping and noising of everything "
                "sent up (the embeddings and, U-shaped, the gradients at the cut and the head), which "
                "is not implemented; set privacy.mechanism = 'none'"
            )
        # The signature above is what the registry checks [algorithm.options] against; its
        # parameters are exactly SAPOptions' fields, which validate them.
        given = locals()
        self.options = SAPOptions(**{f.name: given[f.name] for f in fields(SAPOptions)})

    def server(self, aggregator: Aggregator) -> SAPServer:
        return SAPServer(self.cfg, self.options, aggregator)

    def client(self) -> SAPNode:
        return SAPNode(self.cfg, self.options)
