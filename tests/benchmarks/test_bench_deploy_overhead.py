"""benchmarks/deploy_overhead.py: the per-round shares from the records, and the missed-round replay."""

from __future__ import annotations

from typing import Any

import pytest

BENCHMARK = "deploy_overhead"


def _node(rnd: int, train: float, **phases: float) -> dict[str, Any]:
    base = {
        k: 0.0 for k in ("data_load_s", "model_load_s", "state_load_s", "data_s", "replay_s", "state_save_s")
    }
    return {"round": rnd, "outcome": "ok", "train_s": train, "replayed_seeds": 3, "state_restored": 1,
            **base, **phases}  # fmt: skip


def test_shares_per_steady_round(bench: Any) -> None:
    report = {
        "server_rounds": [{"round": 0}, {"round": 1, "round_s": 30.0}, {"round": 2, "round_s": 20.0}],
        "node_rounds": {
            "0": [_node(1, 5.0, model_load_s=9.0), _node(2, 10.0, state_load_s=1.0, replay_s=0.5)],
            "1": [
                _node(1, 5.0),
                _node(2, 8.0, state_save_s=4.0),
                {"round": 3, "outcome": "CLIENT_EXCEPTION"},
            ],
        },
    }
    (row,) = bench.per_round(report, import_s=0.1)  # round 1 (a cold start) is not steady
    assert row["round"] == 2
    shares = {n["node"]: n for n in row["nodes"]}
    assert shares[0]["fedtune_s"] == pytest.approx(1.6) and shares[0]["training_s"] == 10.0
    assert shares[1]["fedtune_s"] == pytest.approx(4.1)
    assert row["flower_s"] == pytest.approx(20.0 - max(1.6 + 10.0, 4.1 + 8.0))


def test_replay_after_a_missed_round_touches_fewer_seeds(bench: Any, run_cfg: Any) -> None:
    cfg = run_cfg(**{"fedkseed.num-seeds": 256, "zo.local-steps": 4, "federation.clients-per-round": 3})
    out = bench.replay_after_missed_round(cfg, {6: 1})["R6"]
    full, delta = out["full_replay"]["seeds"], out["after_one_missed_round"]["seeds"]
    assert 0 < delta < full <= 6 * 3 * 4
    assert delta <= 2 * 3 * 4 + 4  # the two latest rounds' seeds plus the node's own steps
    assert out["ratio"] > 0
