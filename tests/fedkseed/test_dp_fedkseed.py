"""DP-FedKSeed: the clipped-and-noised scalar, client-level clipping, figure checks, accounting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedtune.config import RunConfig
from fedtune.fedkseed.dp import (
    CLIENT_LEVEL_UNIT,
    DPPlan,
    PerExampleRelease,
    ServerPrivacy,
    client_plan,
    clip_round,
    figures_mismatch,
    sample_plan,
)
from fedtune.flower.testing import run_local
from fedtune.privacy import PrivacyLedger
from fedtune.runtime.checkpoint import load_checkpoint

SAMPLE = {"privacy.mechanism": "sample", "privacy.clip": 2.0, "privacy.noise-multiplier": 1.5}


def _plan(sigma: float = 1.5, clip: float = 2.0) -> DPPlan:
    return DPPlan("sample", clip, sigma, 0.1, 4, sigma * clip)


def test_release_clips_each_example_then_adds_one_gaussian_of_std_sigma_c() -> None:
    plan = _plan()
    release = PerExampleRelease(plan)
    # Two huge opposite outliers are clipped to +-C: the mean of the clipped values is 0 here.
    draws = np.array([release(np.array([1e9, -1e9, 0.5, -0.5])) for _ in range(20000)])
    # The noise is one draw on the sum, divided by the batch: std sigma*C/B.
    assert abs(draws.mean()) < 0.02
    assert draws.std() == pytest.approx(plan.noise_std / 4, rel=0.03)


def test_one_example_moves_the_noiseless_release_by_at_most_c_over_b() -> None:
    rng = np.random.default_rng(0)
    plan = DPPlan("sample", 1.0, 1e-12, 0.1, 1, 1e-12)  # ~no noise: see the sensitivity alone
    release = PerExampleRelease(plan)
    for _ in range(200):
        batch = rng.normal(0, 50, size=8)
        neighbour = batch.copy()
        neighbour[rng.integers(8)] = rng.normal(0, 1e6)
        assert abs(release(batch) - release(neighbour)) <= 2 * plan.clip / 8 + 1e-9


def test_release_refuses_an_empty_batch_and_the_wrong_mechanism() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        PerExampleRelease(_plan())(np.zeros(0))
    with pytest.raises(ValueError, match="sample-level"):
        PerExampleRelease(DPPlan("client", 1.0, 1.0, 0.5, 1, 0.0))


def test_client_level_clip_bounds_the_rounds_seed_vector() -> None:
    seeds = np.array([3, 3, 7, 1], dtype=np.int64)
    grads = np.array([30.0, 10.0, -40.0, 5.0])
    v, scale = clip_round(seeds, grads, num_seeds=16, clip=2.0)
    assert np.linalg.norm(v) == pytest.approx(2.0)
    # a sparse reply with g * scale rebuilds exactly the clipped vector
    rebuilt = np.zeros(16)
    np.add.at(rebuilt, seeds, grads * scale)
    np.testing.assert_allclose(rebuilt, v)
    small, one = clip_round(seeds, grads / 1e3, num_seeds=16, clip=2.0)
    assert one == 1.0 and np.linalg.norm(small) < 2.0


def test_target_epsilon_derives_a_sigma_the_accountant_confirms(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(
        **{"privacy.mechanism": "sample", "privacy.target-epsilon": 4.0, "federation.num-rounds": 5}
    )
    plan = sample_plan(cfg, num_examples=40, local_steps=3, batch_size=2)
    assert plan.sample_rate == pytest.approx(2 / 40) and plan.noise_multiplier > 0
    ledger = PrivacyLedger("rdp")
    for _ in range(5):  # every round: the bound target-epsilon is computed for
        ledger.record(0, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=3)
    eps = ledger.epsilon(cfg.privacy.delta)
    assert 3.0 < eps <= 4.0 + 1e-6


def test_client_level_plan_splits_the_noise_over_the_sampled_clients(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(
        **{
            "privacy.mechanism": "client",
            "privacy.noise-multiplier": 2.0,
            "aggregator.options.weighting": "equal",
        }
    )
    plan = client_plan(cfg)
    m = cfg.federation.clients_per_round
    assert plan.dense_reply and plan.noise_std == pytest.approx(2.0 * cfg.privacy.clip / np.sqrt(m))
    server_cfg = run_cfg(
        **{
            "privacy.mechanism": "client",
            "privacy.noise-multiplier": 2.0,
            "privacy.noise-at": "server",
            "aggregator.options.weighting": "equal",
        }
    )
    assert client_plan(server_cfg).noise_std == 0.0 and not client_plan(server_cfg).dense_reply
    noise = ServerPrivacy(server_cfg, 4096).server_noise()
    assert noise is not None and noise.std() == pytest.approx(2.0 * cfg.privacy.clip, rel=0.05)


def test_figures_that_disagree_with_the_config_are_named() -> None:
    plan = _plan()
    assert figures_mismatch(plan, sigma=1.5, sample_rate=0.1, steps=4, clip=2.0) is None
    assert "noise multiplier" in str(figures_mismatch(plan, sigma=0.1, sample_rate=0.1, steps=4, clip=2.0))
    assert "clip" in str(figures_mismatch(plan, sigma=1.5, sample_rate=0.1, steps=4, clip=50.0))


def test_client_level_refuses_a_weighted_or_robust_aggregator(run_cfg: Any) -> None:
    with pytest.raises(ValueError, match="weighting = 'equal'"):
        run_cfg(**{"privacy.mechanism": "client", "privacy.noise-multiplier": 1.0})
    with pytest.raises(ValueError, match="plain mean"):
        run_cfg(
            **{
                "privacy.mechanism": "client",
                "privacy.noise-multiplier": 1.0,
                "aggregator.name": "median",
                "aggregator.options.weighting": "equal",
            }
        )


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("fresh_models")
def test_a_private_run_reports_a_growing_epsilon_that_survives_resume(run_cfg: Any, tmp_path: Path) -> None:
    cfg: RunConfig = run_cfg(**{**SAMPLE, "federation.num-rounds": 3, "fedkseed.rebuild-each-round": True})
    summary, _ = run_local(cfg, run_dir=tmp_path / "full", state_dir=tmp_path / "s1")
    rows = _rows(tmp_path / "full")
    eps = [r["epsilon"] for r in rows if r["round"] >= 1]
    assert summary["completed_rounds"] == 3
    assert all(r["accepted"] == 3 for r in rows if r["round"] >= 1)
    assert 0 < eps[0] < eps[1] < eps[2]
    assert summary["final_epsilon"] == eps[-1] and summary["final_epsilon_prv"] > 0
    assert all(r["epsilon_prv"] <= r["epsilon_rdp"] * 1.05 for r in rows if r["round"] >= 1)
    # stopped after round 1 and resumed: the accountant's state came back with the checkpoint
    from fedtune.fedkseed.replica import clear_replicas

    clear_replicas()
    run_local(cfg, run_dir=tmp_path / "resumed", state_dir=tmp_path / "s2", stop_after=1)
    clear_replicas()
    run_local(cfg, run_dir=tmp_path / "resumed", resume=True, state_dir=tmp_path / "s2")
    assert [r["epsilon"] for r in _rows(tmp_path / "resumed") if r["round"] >= 1] == pytest.approx(eps)
    state = load_checkpoint(tmp_path / "resumed").server_state
    assert any(k.startswith("dp.") for k in state)


@pytest.mark.usefixtures("fresh_models")
def test_a_reply_without_dp_figures_is_rejected_when_privacy_is_on(run_cfg: Any, tmp_path: Path) -> None:
    """A client that runs without privacy (another config) cannot slip unnoised scalars in."""
    import dataclasses

    from flwr.app import ConfigRecord, RecordDict

    from fedtune.flower.records import RECORD, reply_from
    from fedtune.wire.codec import decode_reply, encode_reply

    cfg: RunConfig = run_cfg(**{**SAMPLE, "federation.num-rounds": 1})

    def strip_dp(node: int, msg: Any) -> Any:
        if node != 1000 or msg.metadata.message_type != "train":
            return msg
        payload = reply_from(msg, 0, 1).payload
        assert payload is not None
        reply = decode_reply(payload, num_seeds=cfg.fedkseed.num_seeds)
        stripped = encode_reply(dataclasses.replace(reply, dp=None))
        msg.content = RecordDict({RECORD: ConfigRecord({"payload": stripped})})
        return msg

    summary, _ = run_local(cfg, run_dir=tmp_path / "run", tamper=strip_dp)
    row = _rows(tmp_path / "run")[1]
    assert row["accepted"] == 2 and "no DP figures" in row["rejections"]
    assert summary["completed_rounds"] == 1


@pytest.mark.usefixtures("fresh_models")
def test_client_level_dp_noised_at_the_client_sends_every_seed(run_cfg: Any, tmp_path: Path) -> None:
    cfg: RunConfig = run_cfg(
        **{
            "privacy.mechanism": "client",
            "privacy.noise-multiplier": 1.0,
            "privacy.clip": 0.5,
            "aggregator.options.weighting": "equal",
            "federation.num-rounds": 1,
        }
    )
    run_local(cfg, run_dir=tmp_path / "run")
    row = _rows(tmp_path / "run")[1]
    assert row["accepted"] == 3 and row["epsilon"] > 0
    assert row["seeds_touched"] == cfg.fedkseed.num_seeds  # noise on all K coordinates
    state = load_checkpoint(tmp_path / "run").server_state
    assert any(k.startswith("dp.") for k in state)
    assert CLIENT_LEVEL_UNIT < 0
