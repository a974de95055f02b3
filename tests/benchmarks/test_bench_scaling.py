"""benchmarks/scaling.py without models: server rounds, the linear fit, bounded state, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

BENCHMARK = "scaling"


def test_server_round_phases_accept_every_client(bench: Any, tmp_path: Path) -> None:
    row = bench.server_round_times("weighted-mean", 20, 2, tmp_path)
    assert row["clients"] == 20
    for phase in ("sync", "aggregate", "checkpoint", "total"):
        assert row[phase]["reps"] == 2 and 0 < row[phase]["min"] <= row[phase]["median"] <= row[phase]["max"]
    assert row["total"]["median"] >= row["aggregate"]["median"]
    assert (tmp_path / "checkpoint.json").exists()


def test_linear_fit_recovers_slope_and_flags_curvature(bench: Any) -> None:
    xs = [32, 64, 128, 256]
    fit = bench.linear_fit(xs, [0.1 + 0.01 * x for x in xs])
    assert fit["s_per_seed"] == pytest.approx(0.01) and fit["r2"] == pytest.approx(1.0)
    assert bench.linear_fit(xs, [1e-4 * x * x for x in xs])["r2"] < 0.98


def test_server_state_stops_growing_once_the_history_is_full(bench: Any) -> None:
    rounds = bench.SYNC_HISTORY_ROUNDS + 16
    memory = bench.memory_over_rounds(rounds, 8)
    assert memory[-1]["history_rounds"] == bench.SYNC_HISTORY_ROUNDS
    assert memory[0]["state_bytes"] < memory[-1]["state_bytes"]
    assert bench.bounded(memory)
    assert not bench.bounded([{"round": r, "state_bytes": r * 100} for r in range(70, 200, 10)])


def test_plot_draws_every_panel(bench: Any, tmp_path: Path) -> None:
    times = {name: {"median": 1.0} for name in ("two_forward", "step_rademacher", "step_gaussian",
                                                "replay_rademacher", "replay_gaussian")}  # fmt: skip
    point = {"nonzero_seeds": 8, "replay_s": {"median": 0.5}}
    result = {
        "params": [{"num_params": 10**6, "replay_seeds": 8, "times": times}],
        "seeds": {"num_params": 10**6, "rademacher": {"points": [point]}, "gaussian": {"points": [point]}},
        "server": {"weighted-mean": {"points": [{"clients": 10, "total": {"median": 0.01}}]}},
        "memory": [{"round": 10, "state_bytes": 1000}],
    }
    bench.plot(result, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
