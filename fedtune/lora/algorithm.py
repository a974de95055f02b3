"""LoRA-FedAvg (FedIT; Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning", ICASSP 2024) as a registered algorithm: options from ``[lora]``, payloads from
``proto/fedtune/v1/lora.proto``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.aggregators.base import Aggregator
from fedtune.algorithms.base import Algorithm, ClientAlgorithm, EvalModel, NodeContext
from fedtune.algorithms.registry import register_algorithm
from fedtune.algorithms.rounds import peak_rss_mb
from fedtune.assets.device import resolve_device
from fedtune.assets.models import load_causal_lm, load_tokenizer
from fedtune.config import RunConfig
from fedtune.lora.fedit import AdapterArrays, adapter_arrays, add_lora, load_adapter_arrays, train_local
from fedtune.lora.server import LoRAFedAvgServer
from fedtune.wire.lora_codec import AdapterReplyPayload, decode_adapter_sync, encode_adapter_reply

_LOCK = threading.Lock()
_MODELS: dict[tuple[Any, ...], tuple[PeftModel, PreTrainedTokenizerBase, AdapterArrays]] = {}


def _cached(cfg: RunConfig) -> tuple[PeftModel, PreTrainedTokenizerBase, AdapterArrays]:
    device = resolve_device(cfg.model.device)
    key = (cfg.model.name, cfg.model.num_layers, str(device), cfg.lora, cfg.run.seed)
    with _LOCK:
        if key not in _MODELS:
            base = load_causal_lm(cfg.model.name, num_layers=cfg.model.num_layers or None)
            # Adapters are initialised on the CPU, then the whole model moves: the starting adapter is
            # the same on every device.
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
        cfg = self.cfg
        sync = decode_adapter_sync(payload)
        model, tokenizer = get_lora_model(cfg)
        load_adapter_arrays(model, sync.arrays)
        key = (cfg.run.seed, sync.server_round, node.partition_id)
        batches = node.data.batches(
            tokenizer,
            batch_size=cfg.lora.batch_size,
            max_length=cfg.model.max_length,
            key=key,
            template=cfg.data.prompt_template,
        )
        result = train_local(
            model, batch_for_step=batches, steps=cfg.lora.local_steps, lr=cfg.lora.lr, key=key
        )
        return encode_adapter_reply(
            AdapterReplyPayload(
                server_round=sync.server_round,
                num_examples=len(node.data),
                train_loss=result.train_loss,
                peak_memory_mb=peak_rss_mb(),
                arrays=adapter_arrays(model),
            )
        )


@register_algorithm("lora-fedavg")
class LoRAFedAvg(Algorithm):
    """LoRA-FedAvg: peft LoRA adapters trained locally with AdamW and averaged by the server."""

    def server(self, aggregator: Aggregator) -> LoRAFedAvgServer:
        return _LoRAServer(self.cfg, aggregator)

    def client(self) -> LoRANode:
        return LoRANode(self.cfg)
