"""Every algorithm through the real ServerApp loop and ClientApp code on the in-process grid, plus Ray."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedtune.config import RunConfig
from fedtune.fedkseed.replica import build_replica
from fedtune.flower.records import reply_from
from fedtune.flower.testing import run_local
from fedtune.runtime.checkpoint import load_checkpoint
from fedtune.wire.codec import decode_reply, decode_sync

K = 64


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    text = (Path(str(summary["run_dir"])) / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


def test_two_rounds_three_clients_accumulator_equals_hand_computed(run_cfg: Any) -> None:
    # Prepare: record every reply the clients send.
    cfg: RunConfig = run_cfg()
    replies: dict[int, list[Message]] = defaultdict(list)

    def record(node: int, msg: Message) -> Message:
        if not msg.has_error() and msg.metadata.message_type == "train":
            replies[int(msg.metadata.group_id)].append(msg)
        return msg

    # Execute
    summary, _ = run_local(cfg, tamper=record)
    # Assert: A = sum_rounds sum_i (n_i / sum n) * sum_t (-lr * g_t) e_{s_t}
    expect = np.zeros(K)
    for rnd, msgs in replies.items():
        decoded = [decode_reply(reply_from(m, 0, rnd).payload or b"", num_seeds=K) for m in msgs]
        total = sum(r.num_examples for r in decoded)
        for r in decoded:
            np.add.at(
                expect,
                r.seed_indices,
                -cfg.zo.lr * r.projected_grads.astype(np.float64) * r.num_examples / total,
            )
    state = load_checkpoint(Path(str(summary["run_dir"]))).server_state
    np.testing.assert_allclose(state["accumulator"], expect, rtol=1e-6, atol=1e-12)  # type: ignore[arg-type]
    assert (
        summary["completed_rounds"] == 2 and len(replies) == 2 and all(len(v) == 3 for v in replies.values())
    )
    # the run folder holds metrics per round, the plot and the resolved config
    lines = rows(summary)
    assert [r["round"] for r in lines] == [0, 1, 2]
    assert {
        "heldout_loss",
        "rouge_l",
        "payload_bytes_up",
        "payload_bytes_down",
        "round_s",
        "client_peak_mb",
    } <= set(lines[1])
    assert (Path(str(summary["run_dir"])) / "curves.png").stat().st_size > 1000
    assert RunConfig.load(Path(str(summary["run_dir"])) / "config.toml") == cfg


def test_pro_and_compact_wire_run_and_export_loads(run_cfg: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from fedtune.export import export_run

    cfg: RunConfig = run_cfg(
        **{
            "run.algorithm": "fedkseed-pro",
            "fedkseed.reply-scalars": "float16",
            "fedkseed.sparse-sync": True,
            "federation.num-rounds": 3,
            "federation.clients-per-round": 2,
        }
    )
    summary, grid = run_local(cfg)
    assert summary["completed_rounds"] == 3
    # Compact download: every sync is a sparse delta (from the node's last confirmed round, or from
    # zero for a new node), each smaller than the dense K floats; it grows as more seeds turn non-zero.
    syncs = [m for m in grid.delivered if m.metadata.message_type == "train"]
    sizes = [len(m.content.config_records["fedtune"]["payload"]) for m in syncs]  # type: ignore[arg-type]
    assert max(sizes) < K * 4 and sizes[0] < sizes[-1]
    assert (
        decode_sync(syncs[-1].content.config_records["fedtune"]["payload"]).quantized_probabilities
        is not None
    )  # type: ignore[arg-type]
    out = export_run(Path(str(summary["run_dir"])), tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out)
    # The export is theta0 + sum_s A_s z_s: the same as a fresh replica synced to the checkpoint.
    fresh = build_replica(cfg)
    acc = load_checkpoint(Path(str(summary["run_dir"]))).server_state["accumulator"]
    fresh.client.sync_to(np.asarray(acc, dtype=np.float64))
    for (name, p), (_, q) in zip(exported.named_parameters(), fresh.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(exported.parameters(), build_replica(cfg).model.parameters(), strict=True)
    )


def test_lora_fedavg_trains_reports_bytes_and_exports_a_peft_adapter(run_cfg: Any, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.export import export_run

    cfg: RunConfig = run_cfg(**{"run.algorithm": "lora-fedavg", "data.eval-generations": 0})
    summary, _ = run_local(cfg)
    assert summary["completed_rounds"] == 2
    assert summary["final_heldout_loss"] < summary["initial_heldout_loss"]  # type: ignore[operator]
    # whole adapter each way: orders of magnitude more than FedKSeed's seeds and scalars
    assert summary["mean_payload_bytes_up"] > 10_000 and summary["mean_payload_bytes_down"] > 10_000  # type: ignore[operator]
    out = export_run(Path(str(summary["run_dir"])), tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()
    with torch.random.fork_rng(devices=[]):  # peft's own init draws from the global RNG
        base = AutoModelForCausalLM.from_pretrained(cfg.model.name)
        loaded = PeftModel.from_pretrained(base, out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in loaded.named_parameters())


def test_outside_aggregator_runs_from_config_without_editing_fedtune(run_cfg: Any) -> None:
    spec = RunConfig.load(
        Path(__file__).resolve().parents[2] / "simulations" / "custom_aggregator.toml"
    ).aggregator.name
    cfg: RunConfig = run_cfg(**{"aggregator.name": spec, "federation.num-rounds": 1})
    summary, _ = run_local(cfg)
    assert summary["completed_rounds"] == 1
    assert "sign_vote" in (Path(str(summary["run_dir"])) / "config.toml").read_text()


@pytest.mark.slow
@pytest.mark.third_party_rng
def test_ray_simulation_smoke(run_cfg: Any) -> None:
    from fedtune.flower.sim import simulate

    cfg: RunConfig = run_cfg(**{"federation.clients-per-round": 2})
    summary = simulate(cfg)
    assert summary["completed_rounds"] == 2
    assert summary["mean_payload_bytes_down"] > K * 4 and summary["mean_payload_bytes_up"] > 0  # type: ignore[operator]
