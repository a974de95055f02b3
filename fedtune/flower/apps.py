"""ServerApp and ClientApp builders; ``server/app.py`` and ``client/app.py`` only call these.

Configuration is ``RunConfig.from_flat(context.run_config ⊕ overrides)``: under ``flwr run`` the
run config holds every key (defaults from pyproject plus ``--run-config``); the programmatic
simulation passes an empty run config, so :mod:`fedtune.flower.sim` injects the whole config
as ``overrides``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune.aggregators import create_aggregator
from fedtune.assets.models import cache_dir
from fedtune.config import RunConfig, Scalar
from fedtune.data.collate import encode_examples
from fedtune.data.sampler import BatchSampler
from fedtune.eval import HeldoutEvaluator
from fedtune.experiment import build_federated_data
from fedtune.fedkseed.client import NodeView
from fedtune.fedkseed.replica import get_replica
from fedtune.fedkseed.server import FedKSeedServer, RoundOutcome
from fedtune.flower.records import payload_content, payload_from
from fedtune.flower.strategy import INFO_RECORD, FedKSeedStrategy, RoundTraffic
from fedtune.recorder import RunRecorder, new_run_dir
from fedtune.wire.codec import decode_sync, encode_reply

log = logging.getLogger(__name__)
Overrides = Mapping[str, Scalar]


def config_from(run_config: Mapping[str, Any], overrides: Overrides | None) -> RunConfig:
    return RunConfig.from_flat({**dict(run_config), **dict(overrides or {})})


# -- server ------------------------------------------------------------------------------------
def run_fedkseed(
    grid: Grid, cfg: RunConfig, *, run_dir: Path | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Run FedKSeed / FedKSeed-Pro for ``cfg`` on ``grid``; returns the run summary."""
    run_dir = run_dir or new_run_dir(cfg)
    replica = get_replica(cfg)
    data = build_federated_data(cfg)
    evaluator = HeldoutEvaluator.for_run(replica.tokenizer, data.heldout, cfg)
    server = FedKSeedServer(
        num_seeds=cfg.fedkseed.num_seeds,
        aggregator=create_aggregator(cfg.aggregator.name, **cfg.aggregator.options()),
        fingerprint=replica.fingerprint,
        pro=cfg.run.algorithm == "fedkseed-pro",
        pro_clip=cfg.fedkseed.pro_clip,
        sparse_sync=cfg.fedkseed.sparse_sync,
    )
    recorder = RunRecorder(run_dir, cfg, quiet=quiet)
    pending: dict[str, Any] = {}

    def on_round(outcome: RoundOutcome, traffic: RoundTraffic, seconds: float) -> None:
        pending.update(
            round=outcome.server_round,
            train_loss=outcome.train_loss,
            accepted=len(outcome.accepted),
            rejected=len(outcome.rejected),
            seeds_touched=outcome.seeds_touched,
            skipped_steps=outcome.skipped_steps,
            client_peak_mb=outcome.peak_memory_mb,
            lr=cfg.zo.lr_at(outcome.server_round, cfg.federation.num_rounds),
            round_s=round(seconds, 3),
            applied=outcome.applied,
            **traffic.summary(),
        )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0 and not pending:
            return None  # the run was stopped below min-replies; nothing new to evaluate
        replica.client.sync_to(server.accumulator)
        result = evaluator(replica.model)
        rec: dict[str, Any] = {
            "round": server_round,
            "heldout_loss": result.heldout_loss,
            "rouge_l": result.rouge_l,
            "exact_match": result.exact_match,
        }
        rec.update(pending)
        pending.clear()
        recorder.record(rec)
        server.save(run_dir / "checkpoint")
        return MetricRecord({"heldout-loss": result.heldout_loss, "rouge-l": result.rouge_l})

    strategy = FedKSeedStrategy(cfg=cfg, server=server, on_round=on_round)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(
            {"accumulator": Array(np.zeros(cfg.fedkseed.num_seeds, dtype=np.float32))}
        ),
        num_rounds=cfg.federation.num_rounds,
        timeout=cfg.federation.round_timeout_s,
        evaluate_fn=evaluate_fn,
    )
    return recorder.finish({"completed_rounds": server.completed_round, "stopped_early": strategy.stopped})


def build_server_app(
    overrides: Overrides | None = None, *, results: list[dict[str, Any]] | None = None
) -> ServerApp:
    """A ServerApp for the configured algorithm; summaries are appended to ``results``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config_from(context.run_config, overrides)
        if cfg.run.algorithm == "lora-fedavg":
            from fedtune.flower.lora_apps import run_lora_fedavg

            summary = run_lora_fedavg(grid, cfg)
        else:
            summary = run_fedkseed(grid, cfg)
        if results is not None:
            results.append(summary)

    return app


# -- client ------------------------------------------------------------------------------------
def _state_path(context: Context, node_id: int) -> Path:
    base = context.node_config.get("state-dir")
    root = Path(str(base)) if base else cache_dir() / "client-state" / f"run-{context.run_id}"
    return root / f"node-{node_id}.npz"


def fedkseed_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """One FedKSeed round on this node's private partition."""
    pid = int(context.node_config.get("partition-id", -1))
    parts = build_federated_data(cfg).train_partitions
    if not 0 <= pid < len(parts):
        raise ValueError(
            f"node_config partition-id={pid} is outside [0, {len(parts)}); set partition-id per SuperNode"
        )
    data = parts[pid]
    sync = decode_sync(payload_from(msg))
    replica = get_replica(cfg)
    prompts, answers, labels = list(data["prompt"]), list(data["answer"]), list(data["label"])
    sampler = BatchSampler(
        num_examples=len(data),
        batch_size=min(sync.batch_size, len(data)),
        key=(cfg.run.seed, sync.server_round, pid),
        labels=labels,
    )

    def batch_for_step(step: int) -> Any:
        idx = sampler.next_indices()
        return encode_examples(
            replica.tokenizer,
            [prompts[i] for i in idx],
            [answers[i] for i in idx],
            max_length=cfg.model.max_length,
        )

    node_id = int(context.node_id)
    path = _state_path(context, node_id)
    reply, view = replica.client.train_round(
        sync,
        client_key=pid,
        view=NodeView.load(path, cfg.fedkseed.num_seeds),
        batch_for_step=batch_for_step,
        num_examples=len(data),
    )
    view.save(path)
    payload = encode_reply(reply, scalar_dtype=cfg.fedkseed.reply_scalars)  # type: ignore[arg-type]
    return Message(payload_content(payload), reply_to=msg)


def build_client_app(overrides: Overrides | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config_from(context.run_config, overrides)
        if cfg.run.algorithm == "lora-fedavg":
            from fedtune.flower.lora_apps import lora_train

            return lora_train(msg, context, cfg)
        return fedkseed_train(msg, context, cfg)

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        """Who this node is: its partition id (the server samples by it, reproducibly)."""
        pid = int(context.node_config.get("partition-id", -1))
        return Message(RecordDict({INFO_RECORD: ConfigRecord({"partition-id": pid})}), reply_to=msg)

    return app
