"""LoRA-FedAvg (FedIT) on Flower's Message API: the baseline FedKSeed is compared against."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.aggregators import create_aggregator
from fedtune.assets.models import load_causal_lm, load_tokenizer
from fedtune.config import RunConfig
from fedtune.data.collate import encode_examples
from fedtune.data.sampler import BatchSampler
from fedtune.eval import HeldoutEvaluator
from fedtune.experiment import build_federated_data
from fedtune.fedkseed.client import peak_rss_mb
from fedtune.flower.records import message_nbytes
from fedtune.flower.strategy import NodeSampler
from fedtune.lora import adapter_arrays, add_lora, load_adapter_arrays, train_local
from fedtune.lora.server import AdapterReply, LoRAFedAvgServer
from fedtune.recorder import RunRecorder, new_run_dir

log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_MODELS: dict[tuple[Any, ...], tuple[PeftModel, PreTrainedTokenizerBase]] = {}


def get_lora_model(cfg: RunConfig) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Process-wide LoRA model for this config (every user loads adapter arrays before use)."""
    key = (cfg.model.name, cfg.model.num_layers, cfg.lora, cfg.run.seed)
    with _LOCK:
        if key not in _MODELS:
            base = load_causal_lm(cfg.model.name, num_layers=cfg.model.num_layers or None)
            _MODELS[key] = (add_lora(base, cfg.lora, seed=cfg.run.seed), load_tokenizer(cfg.model.name))
        return _MODELS[key]


def _array_record_nbytes(record: ArrayRecord) -> int:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(record).values())


class LoRAFedAvgStrategy(Strategy):
    """Sends the global adapter, collects updated adapters, aggregates via the aggregator API."""

    def __init__(self, *, cfg: RunConfig, server: LoRAFedAvgServer, recorder_hook: Any) -> None:
        self.cfg, self.server, self.hook = cfg, server, recorder_hook
        self.stopped = False
        self.sampler = NodeSampler(run_seed=cfg.run.seed)
        self._expected: set[int] = set()
        self._t0 = 0.0
        self._traffic: dict[str, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopped:
            return []
        self._t0 = time.perf_counter()
        chosen = self.sampler.sample(grid, self.cfg.federation.clients_per_round, server_round)
        self._expected = set(chosen)
        record = ArrayRecord({k: Array(v) for k, v in self.server.global_arrays.items()})
        conf = ConfigRecord({"server-round": server_round})
        msgs = [
            Message(
                RecordDict({"arrays": record, "config": conf}),
                n,
                MessageType.TRAIN,
                group_id=str(server_round),
            )
            for n in chosen
        ]
        self._traffic = {
            "payload_bytes_down": float(_array_record_nbytes(record)),
            "message_bytes_down": float(message_nbytes(msgs[0])),
        }
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        parsed: list[AdapterReply] = []
        ups: list[int] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                log.warning(
                    "round %d: node %d replied with an error: %s", server_round, node, msg.error.reason
                )
                continue
            try:
                rec, met = msg.content.array_records["arrays"], msg.content.metric_records["metrics"]
                parsed.append(
                    AdapterReply(
                        node_id=node,
                        server_round=int(met["server-round"]),  # type: ignore[arg-type]
                        num_examples=int(met["num-examples"]),  # type: ignore[arg-type]
                        arrays={k: rec[k].numpy() for k in rec},
                        train_loss=float(met["train-loss"]),  # type: ignore[arg-type]
                        peak_memory_mb=float(met["peak-memory-mb"]),  # type: ignore[arg-type]
                    )
                )
                ups.append(_array_record_nbytes(rec))
                if "message_bytes_up" not in self._traffic:
                    self._traffic["message_bytes_up"] = float(message_nbytes(msg))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("round %d: rejected malformed reply from node %d: %s", server_round, node, exc)
        outcome = self.server.aggregate_round(
            server_round, parsed, expected=self._expected, min_replies=self.cfg.federation.min_replies
        )
        self._traffic["payload_bytes_up"] = float(np.mean(ups)) if ups else 0.0
        if not outcome.applied:
            self.stopped = True
        self.hook(outcome, self._traffic, time.perf_counter() - self._t0)
        return ArrayRecord({k: Array(v) for k, v in self.server.global_arrays.items()}), None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "LoRA-FedAvg (FedIT): rank %d, lr %g, %d local steps",
            self.cfg.lora.rank,
            self.cfg.lora.lr,
            self.cfg.lora.local_steps,
        )


def run_lora_fedavg(
    grid: Grid, cfg: RunConfig, *, run_dir: Path | None = None, quiet: bool = False
) -> dict[str, Any]:
    run_dir = run_dir or new_run_dir(cfg)
    model, tokenizer = get_lora_model(cfg)
    init = adapter_arrays(model)
    data = build_federated_data(cfg)
    evaluator = HeldoutEvaluator.for_run(tokenizer, data.heldout, cfg)
    server = LoRAFedAvgServer(dict(init), create_aggregator(cfg.aggregator.name, **cfg.aggregator.options()))
    recorder = RunRecorder(run_dir, cfg, quiet=quiet)
    pending: dict[str, Any] = {}

    def hook(outcome: Any, traffic: dict[str, float], seconds: float) -> None:
        pending.update(
            round=outcome.server_round,
            train_loss=outcome.train_loss,
            accepted=len(outcome.accepted),
            rejected=len(outcome.rejected),
            client_peak_mb=outcome.peak_memory_mb,
            round_s=round(seconds, 3),
            applied=outcome.applied,
            **traffic,
        )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0 and not pending:
            return None
        load_adapter_arrays(model, server.global_arrays)
        res = evaluator(model.get_base_model())
        rec: dict[str, Any] = {
            "round": server_round,
            "heldout_loss": res.heldout_loss,
            "rouge_l": res.rouge_l,
            "exact_match": res.exact_match,
        }
        rec.update(pending)
        pending.clear()
        recorder.record(rec)
        return MetricRecord({"heldout-loss": res.heldout_loss})

    strategy = LoRAFedAvgStrategy(cfg=cfg, server=server, recorder_hook=hook)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in init.items()}),
        num_rounds=cfg.federation.num_rounds,
        timeout=cfg.federation.round_timeout_s,
        evaluate_fn=evaluate_fn,
    )
    np.savez(run_dir / "adapter.npz", **server.global_arrays)  # type: ignore[arg-type]
    return recorder.finish({"completed_rounds": server.completed_round, "stopped_early": strategy.stopped})


def lora_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    pid = int(context.node_config.get("partition-id", -1))
    parts = build_federated_data(cfg).train_partitions
    if not 0 <= pid < len(parts):
        raise ValueError(f"node_config partition-id={pid} is outside [0, {len(parts)})")
    data = parts[pid]
    server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
    rec = msg.content.array_records["arrays"]
    model, tokenizer = get_lora_model(cfg)
    load_adapter_arrays(model, {k: rec[k].numpy() for k in rec})
    prompts, answers = list(data["prompt"]), list(data["answer"])
    sampler = BatchSampler(
        num_examples=len(data),
        batch_size=min(cfg.lora.batch_size, len(data)),
        key=(cfg.run.seed, server_round, pid),
        labels=list(data["label"]),
    )

    def batch_for_step(step: int) -> Any:
        idx = sampler.next_indices()
        return encode_examples(
            tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx], max_length=cfg.model.max_length
        )

    result = train_local(
        model,
        batch_for_step=batch_for_step,
        steps=cfg.lora.local_steps,
        lr=cfg.lora.lr,
        key=(cfg.run.seed, server_round, pid),
    )
    out = adapter_arrays(model)
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "train-loss": result.train_loss,
            "peak-memory-mb": peak_rss_mb(),
            "server-round": server_round,
        }
    )
    return Message(
        RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in out.items()}), "metrics": metrics}),
        reply_to=msg,
    )
