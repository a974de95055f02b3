"""LoRA-FedAvg (FedIT; Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning", ICASSP 2024) as a registered algorithm: options from ``[lora]``, payloads from
``proto/fedtune/v1/lora.proto``.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.aggregators.base import Aggregator
from fedtune.algorithms.base import Algorithm, ClientAlgorithm, EvalModel, NodeContext, Summand
from fedtune.algorithms.registry import register_algorithm
from fedtune.algorithms.rounds import peak_rss_mb
from fedtune.assets.device import resolve_device
from fedtune.assets.models import load_causal_lm, load_tokenizer
from fedtune.config import RunConfig
from fedtune.lora.dp import (
    LoRAServerPrivacy,
    client_noise_std,
    dp_figures,
    dp_sgd_settings,
    poisson_batches,
    private_client_update,
)
from fedtune.lora.fedit import (
    AdapterArrays,
    LocalResult,
    adapter_arrays,
    add_lora,
    load_adapter_arrays,
    train_local,
    train_local_private,
)
from fedtune.lora.server import SUMMED, LoRAFedAvgServer
from fedtune.privacy.noise import SecureGaussian
from fedtune.wire.lora_codec import AdapterReplyPayload, decode_adapter_sync, encode_adapter_reply

_LOCK = threading.Lock()
_MODELS: dict[tuple[Any, ...], tuple[PeftModel, PreTrainedTokenizerBase, AdapterArrays]] = {}


def _cached(cfg: RunConfig) -> tuple[PeftModel, PreTrainedTokenizerBase, AdapterArrays]:
    device = resolve_device(cfg.model.device)
    key = (cfg.model.name, cfg.model.num_layers, str(device), cfg.lora, cfg.run.seed)
    with _LOCK:
        if key not in _MODELS:
            base = load_causal_lm(cfg.model.name, num_layers=cfg.model.num_layers or None)
            # The base moves before peft wraps it (opacus#820: LoRA weights wrapped before the move
            # were not updated under DP-SGD); lora_A is drawn from a CPU generator and copied in, so
            # the starting adapter is the same on every device.
            base.to(device)  # type: ignore[arg-type]  # transformers types .to() as a dtype cast
            model = add_lora(base, cfg.lora, seed=cfg.run.seed)
            model.to(device)
            _MODELS[key] = (model, load_tokenizer(cfg.model.name), adapter_arrays(model))
        return _MODELS[key]


def get_lora_model(cfg: RunConfig) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Process-wide LoRA model for this config (every user loads adapter arrays before use)."""
    model, tokenizer, _ = _cached(cfg)
    return model, tokenizer


def initial_adapter(cfg: RunConfig) -> AdapterArrays:
    """The keyed initial adapter (lora_B = 0): the same in every process, whatever ran before."""
    return {k: v.copy() for k, v in _cached(cfg)[2].items()}


def clear_lora_models() -> None:
    with _LOCK:
        _MODELS.clear()


class _LoRAServer(LoRAFedAvgServer):
    """The server half with its peft model: exports the adapter folder peft loads."""

    def __init__(self, cfg: RunConfig, aggregator: Aggregator) -> None:
        self.model, self.tokenizer = get_lora_model(cfg)
        super().__init__(
            initial_adapter(cfg),
            aggregator,
            max_weight_ratio=cfg.aggregator.max_weight_ratio,
            eval_model=self._eval,
            privacy=LoRAServerPrivacy(cfg) if cfg.privacy.enabled else None,
        )

    def _eval(self, arrays: AdapterArrays) -> EvalModel:
        load_adapter_arrays(self.model, arrays)
        return EvalModel(self.model.get_base_model(), self.tokenizer)  # type: ignore[arg-type]

    def export(self, out_dir: Path) -> None:
        load_adapter_arrays(self.model, self.global_arrays)
        self.model.save_pretrained(str(out_dir))  # adapter_config.json + adapter_model.safetensors
        self.tokenizer.save_pretrained(out_dir)


class LoRANode(ClientAlgorithm):
    """One FedIT round: load the global adapter, local AdamW steps, reply with the new adapter."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def train(self, payload: bytes, node: NodeContext) -> bytes:
        return encode_adapter_reply(self._round(payload, node)[0])

    def train_summand(self, payload: bytes, node: NodeContext) -> Summand:
        """The adapter update (trained minus received) into the secure sum; the rest in the clear."""
        reply, received = self._round(payload, node)
        vector = np.concatenate(
            [(reply.arrays[k].astype(np.float64) - received[k]).ravel() for k in received]
        )
        public = dataclasses.replace(reply, arrays={SUMMED: np.zeros(1, np.float32)})
        return Summand(vector=vector, weight=float(reply.num_examples), public=encode_adapter_reply(public))

    def _round(self, payload: bytes, node: NodeContext) -> tuple[AdapterReplyPayload, AdapterArrays]:
        cfg = self.cfg
        sync = decode_adapter_sync(payload)
        model, tokenizer = get_lora_model(cfg)
        load_adapter_arrays(model, sync.arrays)
        key = (cfg.run.seed, sync.server_round, node.partition_id)
        num_examples = len(node.data)
        figures = dp_figures(cfg, num_examples=num_examples)
        rng = SecureGaussian() if figures is not None else None
        if figures is not None and rng is not None and cfg.privacy.mechanism == "sample":
            batches = poisson_batches(
                node.data,
                tokenizer,
                sample_rate=figures.sample_rate,
                max_length=cfg.model.max_length,
                template=cfg.data.prompt_template,
                rng=rng,
            )
            result: LocalResult = train_local_private(
                model,
                batch_for_step=batches,
                steps=cfg.lora.local_steps,
                lr=cfg.lora.lr,
                key=key,
                settings=dp_sgd_settings(cfg, figures, num_examples),
                noise=rng,
            )
            arrays = adapter_arrays(model)
        else:
            result = train_local(
                model,
                batch_for_step=node.data.batches(
                    tokenizer,
                    batch_size=cfg.lora.batch_size,
                    max_length=cfg.model.max_length,
                    key=key,
                    template=cfg.data.prompt_template,
                ),
                steps=cfg.lora.local_steps,
                lr=cfg.lora.lr,
                key=key,
            )
            arrays = adapter_arrays(model)
            if figures is not None and rng is not None:  # client level: clip (and noise) the update
                arrays = private_client_update(
                    arrays,
                    sync.arrays,
                    clip=figures.clip,
                    noise_std=client_noise_std(cfg, figures),
                    rng=rng,
                )
        reply = AdapterReplyPayload(
            server_round=sync.server_round,
            num_examples=num_examples,
            train_loss=result.train_loss,
            peak_memory_mb=peak_rss_mb(),
            arrays=arrays,
            dp=figures,
        )
        return reply, {k: np.asarray(v, np.float32) for k, v in sync.arrays.items()}


@register_algorithm("lora-fedavg")
class LoRAFedAvg(Algorithm):
    """LoRA-FedAvg: peft LoRA adapters trained locally with AdamW and averaged by the server.

    Privacy (:mod:`fedtune.lora.dp`): ``sample`` runs the local steps as opacus DP-SGD; ``client``
    is DP-FedAvg (each client's round update clipped, Gaussian noise at the clients or the server).
    """

    privacy_mechanisms: ClassVar[tuple[str, ...]] = ("sample", "client")
    supports_secure_aggregation: ClassVar[bool] = True

    def server(self, aggregator: Aggregator) -> LoRAFedAvgServer:
        return _LoRAServer(self.cfg, aggregator)

    def client(self) -> LoRANode:
        return LoRANode(self.cfg)
