"""FedKSeed through real ServerApp/ClientApp code on the in-process grid (no Ray), plus a Ray smoke test."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.config import RunConfig
from fedtune.fedkseed.replica import build_replica, clear_replicas
from fedtune.flower.apps import build_client_app, run_fedkseed
from fedtune.flower.records import PAYLOAD, RECORD, payload_from
from fedtune.flower.testing import LocalGrid
from fedtune.wire.codec import decode_reply

K = 64


def tiny_cfg(model_dir: Path, out: Path, **extra: Any) -> RunConfig:
    flat: dict[str, Any] = {
        "model.name": str(model_dir),
        "model.max-length": 48,
        "data.max-train-examples": 60,
        "data.heldout-size": 8,
        "data.eval-generations": 2,
        "data.max-new-tokens": 2,
        "fedkseed.num-seeds": K,
        "zo.local-steps": 3,
        "zo.batch-size": 2,
        "zo.lr": 1e-2,
        "federation.num-clients": 3,
        "federation.clients-per-round": 3,
        "federation.num-rounds": 2,
        "run.output-dir": str(out),
    }
    flat.update(extra)
    return RunConfig.from_flat(flat)


@pytest.fixture(autouse=True)
def _fresh_replicas() -> None:
    clear_replicas()


def run(cfg: RunConfig, tamper: Any = None) -> tuple[dict[str, Any], LocalGrid]:
    grid = LocalGrid(build_client_app(cfg.to_flat()), cfg.federation.num_clients, tamper=tamper)
    return run_fedkseed(grid, cfg, quiet=True), grid


def test_two_rounds_three_clients_accumulator_equals_hand_computed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: record every reply the clients send.
    cfg = tiny_cfg(tiny_model_dir, tmp_path)
    replies: dict[int, list[Message]] = defaultdict(list)

    def record(node: int, msg: Message) -> Message:
        if msg.metadata.message_type == "train":
            replies[int(msg.metadata.group_id)].append(msg)
        return msg

    # Execute
    summary, _ = run(cfg, record)
    # Assert: A = sum_rounds sum_i (n_i / sum n) * sum_t (-lr * g_t) e_{s_t}
    expect = np.zeros(K)
    for msgs in replies.values():
        decoded = [decode_reply(payload_from(m), num_seeds=K) for m in msgs]
        total = sum(r.num_examples for r in decoded)
        for r in decoded:
            np.add.at(
                expect,
                r.seed_indices,
                -cfg.zo.lr * r.projected_grads.astype(np.float64) * r.num_examples / total,
            )
    state = np.load(Path(summary["run_dir"]) / "checkpoint" / "server_state.npz")
    np.testing.assert_allclose(state["accumulator"], expect, rtol=1e-6, atol=1e-12)
    assert (
        summary["completed_rounds"] == 2 and len(replies) == 2 and all(len(v) == 3 for v in replies.values())
    )
    # the run folder holds metrics per round, the plot and the resolved config
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2]
    assert {
        "heldout_loss",
        "rouge_l",
        "payload_bytes_up",
        "payload_bytes_down",
        "round_s",
        "client_peak_mb",
    } <= set(lines[1])
    assert (Path(summary["run_dir"]) / "curves.png").stat().st_size > 1000
    assert RunConfig.load(Path(summary["run_dir"]) / "config.toml") == cfg


def test_broken_reply_is_rejected_and_the_round_proceeds(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_model_dir, tmp_path, **{"federation.num-rounds": 1})
    victim: list[int] = []

    def corrupt(node: int, msg: Message) -> Message:
        if msg.metadata.message_type == "train" and not victim:
            victim.append(node)
            msg.content = RecordDict({RECORD: ConfigRecord({PAYLOAD: b"\x08\x99garbage"})})
        return msg

    summary, _ = run(cfg, corrupt)
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["accepted"] == 2 and lines[1]["rejected"] == 1
    assert summary["completed_rounds"] == 1


def test_below_min_replies_the_run_ends_cleanly(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_model_dir, tmp_path, **{"federation.min-replies": 3})

    def drop_one(node: int, msg: Message) -> Message:
        if node == 1000 and msg.metadata.message_type == "train":
            msg.content = RecordDict({RECORD: ConfigRecord({PAYLOAD: b""})})
        return msg

    summary, _ = run(cfg, drop_one)
    assert summary["completed_rounds"] == 0 and summary["stopped_early"] is True
    state = np.load(Path(summary["run_dir"]) / "checkpoint" / "server_state.npz")
    assert not state["accumulator"].any()


def test_pro_and_compact_wire_run_and_export_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from fedtune.export import export_run

    cfg = tiny_cfg(
        tiny_model_dir,
        tmp_path,
        **{
            "run.algorithm": "fedkseed-pro",
            "fedkseed.reply-scalars": "float16",
            "fedkseed.sparse-sync": True,
            "federation.num-rounds": 3,
            "federation.clients-per-round": 2,
        },
    )
    summary, grid = run(cfg)
    assert summary["completed_rounds"] == 3
    # Compact download: every sync is a sparse delta (from the node's last sync, or from zero for a
    # new node), each smaller than the dense K floats alone; it grows as more seeds become non-zero.
    sizes = [len(payload_from(m)) for m in grid.delivered if m.metadata.message_type == "train"]
    assert max(sizes) < K * 4 and sizes[0] < sizes[-1]
    out = export_run(Path(summary["run_dir"]), tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out)
    # The export is theta0 + sum_s A_s z_s: the same as a fresh replica synced to the checkpoint.
    fresh = build_replica(cfg)
    fresh.client.sync_to(np.load(Path(summary["run_dir"]) / "checkpoint" / "server_state.npz")["accumulator"])
    for (name, p), (_, q) in zip(exported.named_parameters(), fresh.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    # and it moved away from the pretrained weights
    assert any(
        not torch.equal(p, q)
        for p, q in zip(exported.parameters(), build_replica(cfg).model.parameters(), strict=True)
    )


@pytest.mark.slow
@pytest.mark.third_party_rng
def test_ray_simulation_smoke(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.flower.sim import simulate

    cfg = tiny_cfg(tiny_model_dir, tmp_path, **{"federation.clients-per-round": 2})
    summary = simulate(cfg)
    assert summary["completed_rounds"] == 2
    assert summary["mean_payload_bytes_down"] > K * 4 and summary["mean_payload_bytes_up"] > 0


def test_outside_aggregator_runs_from_config_without_editing_fedtune(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = RunConfig.load(
        Path(__file__).resolve().parents[2] / "simulations" / "custom_aggregator.toml"
    ).aggregator.name
    cfg = tiny_cfg(tiny_model_dir, tmp_path, **{"aggregator.name": spec, "federation.num-rounds": 1})
    summary, _ = run(cfg)
    assert summary["completed_rounds"] == 1
    assert "sign_vote" in (Path(summary["run_dir"]) / "config.toml").read_text()
