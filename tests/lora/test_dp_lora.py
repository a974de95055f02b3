"""Private LoRA-FedAvg: DP-SGD clients (sample level) and DP-FedAvg (client level), the server's checks
of each reply's DP figures, the epsilon in metrics.jsonl and the ledger across a resume.

Runs go through :class:`~fedtune.runtime.direct.DirectTransport` and the real :class:`RunLoop` (no Flower).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtune.algorithms.base import NodeReply
from fedtune.config import RunConfig
from fedtune.lora.algorithm import clear_lora_models
from fedtune.lora.dp import (
    CLIENT_LEVEL_UNIT,
    LoRAServerPrivacy,
    clip_update,
    dp_figures,
    private_client_update,
)
from fedtune.privacy import PrivacyLedger, SecureGaussian
from fedtune.runtime.checkpoint import load_checkpoint
from fedtune.runtime.direct import DirectTransport, ReplyHook
from fedtune.runtime.loop import RunLoop
from fedtune.wire.dp_report import DPFigures
from fedtune.wire.lora_codec import decode_adapter_reply, encode_adapter_reply

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("fresh_models"),
]

LORA = {"run.algorithm": "lora-fedavg"}
SAMPLE = {**LORA, "privacy.mechanism": "sample", "privacy.clip": 1.0, "privacy.noise-multiplier": 1.2}
CLIENT = {
    **LORA,
    "privacy.mechanism": "client",
    "privacy.clip": 0.05,
    "privacy.noise-multiplier": 1.0,
    "aggregator.name": "weighted-mean",
    "aggregator.options.weighting": "equal",
}


def _run(
    cfg: RunConfig,
    run_dir: Path,
    state: Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    hook: ReplyHook | None = None,
) -> dict[str, Any]:
    n = cfg.federation.num_clients
    nodes = [{"partition-id": i, "num-partitions": n, "state-dir": str(state)} for i in range(n)]
    loop = RunLoop(
        cfg,
        DirectTransport(cfg, nodes, hook=hook),  # type: ignore[arg-type]
        run_dir=run_dir,
        resume=resume,
        quiet=True,
        settle_s=0.0,
        stop_after=stop_after,
    )
    return dict(loop.run())


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_figures_follow_the_config(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(**SAMPLE)
    f = dp_figures(cfg, num_examples=20)
    assert f == DPFigures(noise_multiplier=1.2, sample_rate=2 / 20, steps=2, clip=1.0)
    assert dp_figures(cfg, num_examples=1) == DPFigures(1.2, 1.0, 2, 1.0)  # q capped at 1
    assert dp_figures(run_cfg(**LORA), num_examples=20) is None
    client = dp_figures(run_cfg(**CLIENT), num_examples=20)
    assert client == DPFigures(noise_multiplier=1.0, sample_rate=1.0, steps=1, clip=0.05)


def test_target_epsilon_gives_a_sigma_whose_whole_run_meets_it(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(
        **{
            **SAMPLE,
            "privacy.noise-multiplier": 0.0,
            "privacy.target-epsilon": 5.0,
            "federation.num-rounds": 4,
        }
    )
    f = dp_figures(cfg, num_examples=20)
    assert f is not None and f.noise_multiplier > 0
    ledger = PrivacyLedger(cfg.privacy.accountant)
    for _ in range(cfg.federation.num_rounds):  # the client in every round: the bound sigma is for
        ledger.record(0, noise_multiplier=f.noise_multiplier, sample_rate=f.sample_rate, steps=f.steps)
    assert 4.0 < ledger.epsilon(cfg.privacy.delta) <= 5.0 + 1e-6


def test_client_level_update_is_clipped_and_noised_with_the_clients_share() -> None:
    rng = SecureGaussian()
    gen = np.random.default_rng(0)
    received = {
        "a": gen.normal(size=(8, 4)).astype(np.float32),
        "b": gen.normal(size=(16,)).astype(np.float32),
    }
    trained = {k: v + gen.normal(0, 3.0, size=v.shape).astype(np.float32) for k, v in received.items()}
    out = private_client_update(trained, received, clip=0.5, noise_std=0.0, rng=rng)
    delta = {k: out[k].astype(np.float64) - received[k] for k in received}
    norm = np.sqrt(sum(np.sum(d**2) for d in delta.values()))
    assert norm == pytest.approx(0.5, rel=1e-5)  # over the bound: scaled onto it (float32 rounding aside)
    small = {k: v + np.float32(1e-3) for k, v in received.items()}
    kept = private_client_update(small, received, clip=0.5, noise_std=0.0, rng=rng)
    assert all(np.allclose(kept[k], small[k]) for k in small)  # within the bound: untouched
    big = {"w": np.zeros(20_000, np.float32)}
    noisy = private_client_update(big, big, clip=0.5, noise_std=0.3, rng=rng)
    assert noisy["w"].std() == pytest.approx(0.3, rel=0.03)
    clipped, before = clip_update({"x": np.full(4, 3.0)}, 1.0)
    assert before == pytest.approx(6.0) and np.linalg.norm(clipped["x"]) == pytest.approx(1.0)


def test_a_private_lora_run_reports_a_growing_epsilon_that_survives_resume(
    run_cfg: Any, tmp_path: Path
) -> None:
    cfg: RunConfig = run_cfg(**{**SAMPLE, "federation.num-rounds": 3})
    summary = _run(cfg, tmp_path / "full", tmp_path / "s1")
    rows = [r for r in _rows(tmp_path / "full") if r["round"] >= 1]
    assert summary["completed_rounds"] == 3 and all(r["accepted"] == 3 for r in rows)
    eps = [r["epsilon"] for r in rows]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert all(r["epsilon"] == r["epsilon_rdp"] for r in rows)
    assert all(0.5 * r["epsilon_rdp"] <= r["epsilon_prv"] <= 1.05 * r["epsilon_rdp"] for r in rows)
    # each client joined every round: 3 rounds of 2 steps at q = batch / its examples; the worst one
    ledger = _ledger(tmp_path / "full")
    assert sorted(ledger.histories) == [0, 1, 2]
    for hist in ledger.histories.values():
        assert [(s, n) for s, _, n in hist] == [(1.2, 6)] and 0 < hist[0][1] <= 1
    worst = max(h[0][1] for h in ledger.histories.values())
    ref = PrivacyLedger()
    ref.record(0, noise_multiplier=1.2, sample_rate=worst, steps=6)
    assert eps[2] == pytest.approx(ref.epsilon(cfg.privacy.delta), rel=1e-12)
    # stopped after round 1, resumed in a fresh process: the ledger came back with the checkpoint
    clear_lora_models()
    _run(cfg, tmp_path / "resumed", tmp_path / "s2", stop_after=1)
    clear_lora_models()
    _run(cfg, tmp_path / "resumed", tmp_path / "s2", resume=True)
    resumed = [r["epsilon"] for r in _rows(tmp_path / "resumed") if r["round"] >= 1]
    assert resumed == pytest.approx(eps, rel=1e-12)
    state = load_checkpoint(tmp_path / "resumed").server_state
    assert any(k.startswith("dp.") for k in state)


def _ledger(run_dir: Path) -> PrivacyLedger:
    state = load_checkpoint(run_dir).server_state
    ledger = PrivacyLedger()
    ledger.load_state_dict({k.removeprefix("dp."): v for k, v in state.items() if k.startswith("dp.")})
    return ledger


def _retouch(node: int, change: Any) -> ReplyHook:
    def hook(reply: NodeReply) -> NodeReply:
        if reply.node_id != node or reply.payload is None:
            return reply
        decoded = decode_adapter_reply(reply.payload)
        return NodeReply(
            node, payload=encode_adapter_reply(dataclasses.replace(decoded, dp=change(decoded.dp)))
        )

    return hook


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda dp: None, "no DP figures"),
        (lambda dp: dataclasses.replace(dp, clip=50.0), "reports clip 50"),
        (lambda dp: dataclasses.replace(dp, noise_multiplier=0.01), "reports noise multiplier 0.01"),
    ],
    ids=["no-dp", "clip", "sigma"],
)
def test_a_reply_without_or_with_other_dp_figures_is_rejected(
    run_cfg: Any, tmp_path: Path, change: Any, reason: str
) -> None:
    cfg: RunConfig = run_cfg(**{**SAMPLE, "federation.num-rounds": 1})
    summary = _run(cfg, tmp_path / "run", tmp_path / "s", hook=_retouch(1, change))
    row = _rows(tmp_path / "run")[1]
    assert summary["completed_rounds"] == 1
    assert row["accepted"] == 2 and reason in row["rejections"]
    # the rejected client's release is not on the ledger: only the two others' single round
    ledger = _ledger(tmp_path / "run")
    assert sorted(ledger.histories) == [0, 2]
    assert row["epsilon"] == pytest.approx(ledger.epsilon(cfg.privacy.delta), rel=1e-12)


@pytest.mark.parametrize("noise_at", ["client", "server"])
def test_client_level_dp_fedavg_round(run_cfg: Any, tmp_path: Path, noise_at: str) -> None:
    cfg: RunConfig = run_cfg(**{**CLIENT, "privacy.noise-at": noise_at, "federation.num-rounds": 2})
    summary = _run(cfg, tmp_path / "run", tmp_path / "s")
    rows = [r for r in _rows(tmp_path / "run") if r["round"] >= 1]
    assert summary["completed_rounds"] == 2 and all(r["accepted"] == 3 for r in rows)
    ref = PrivacyLedger()
    ref.record(CLIENT_LEVEL_UNIT, noise_multiplier=1.0, sample_rate=1.0, steps=2)
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] == pytest.approx(ref.epsilon(cfg.privacy.delta))


def test_the_server_enforces_the_clip_when_it_adds_the_noise(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(**{**CLIENT, "privacy.noise-at": "server"})
    privacy = LoRAServerPrivacy(cfg)
    clipped = privacy.server_clip({"a": np.full((10, 10), 1.0, np.float32)})
    assert np.linalg.norm(clipped["a"]) == pytest.approx(0.05, rel=1e-5)
    noise = privacy.server_noise({"a": (100, 100)})
    assert noise is not None and noise["a"].std() == pytest.approx(1.0 * 0.05, rel=0.05)
    at_client = LoRAServerPrivacy(run_cfg(**CLIENT))  # noised updates: the server cannot re-clip them
    assert at_client.server_noise({"a": (2,)}) is None
    assert np.array_equal(at_client.server_clip({"a": np.ones(3, np.float32)})["a"], np.ones(3))


def test_client_level_refuses_a_weighted_or_robust_aggregator(run_cfg: Any) -> None:
    from fedtune.algorithms.registry import create_algorithm

    with pytest.raises(ValueError, match="weighting = 'equal'"):
        create_algorithm(run_cfg(**{**CLIENT, "aggregator.options.weighting": "examples"}))


def test_a_checkpoint_without_a_ledger_is_refused(run_cfg: Any) -> None:
    privacy = LoRAServerPrivacy(run_cfg(**SAMPLE))
    with pytest.raises(ValueError, match="no privacy ledger"):
        privacy.ledger_from_state({"version": 1})
    other = PrivacyLedger("prv")
    other.record(0, noise_multiplier=1.0, sample_rate=0.1, steps=1)
    with pytest.raises(ValueError):
        privacy.ledger_from_state({f"dp.{k}": v for k, v in other.state_dict().items()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dp_sgd_on_cuda_starts_like_the_cpu_and_moves_the_weights(run_cfg: Any) -> None:
    """opacus#820 on the device it was reported on: the base moves before peft wraps it."""
    from fedtune.data.collate import encode_examples
    from fedtune.lora.algorithm import get_lora_model, initial_adapter
    from fedtune.lora.dp import dp_sgd_settings
    from fedtune.lora.fedit import adapter_arrays, train_local_private

    cfg: RunConfig = run_cfg(**{**SAMPLE, "model.device": "cuda"})
    model, tok = get_lora_model(cfg)
    start = initial_adapter(cfg)
    cpu_start = initial_adapter(run_cfg(**SAMPLE))
    assert all(np.array_equal(start[k], cpu_start[k]) for k in start)
    batch = encode_examples(tok, ["Say yes.", "Say no."], ["yes", "no"], max_length=32)
    figures = dp_figures(cfg, num_examples=20)
    assert figures is not None
    result = train_local_private(
        model,
        batch_for_step=lambda t: batch if t == 0 else None,
        steps=2,
        lr=1e-2,
        key=(0, 1, 0),
        settings=dp_sgd_settings(cfg, figures, 20),
    )
    assert result.empty_steps == 1 and np.isfinite(result.train_loss)
    moved = adapter_arrays(model)
    assert all(np.isfinite(v).all() for v in moved.values())
    assert any(not np.array_equal(moved[k], start[k]) for k in start if "lora_B" in k)
