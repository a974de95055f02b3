"""benchmarks/sap_privacy.py: the target is judged against the unprivatized split, honestly."""

from __future__ import annotations

from typing import Any

BENCHMARK = "sap_privacy"


def _p(acc: float, priv: float) -> dict[str, Any]:
    return {"accuracy": acc, "empirical_privacy": priv}


def test_target_takes_the_most_private_point_within_one_accuracy_point(bench: Any) -> None:
    base = _p(0.83, 0.0)
    result = bench.target([_p(0.825, 0.6), _p(0.80, 0.9), _p(0.83, 0.3)], base)
    assert result["best_point"] == _p(0.825, 0.6)
    assert result["met"] is True and result["privacy_gain"] == 0.6


def test_target_missed_when_no_point_is_private_enough(bench: Any) -> None:
    result = bench.target([_p(0.83, 0.4), _p(0.70, 0.95)], _p(0.83, 0.0))
    assert result["met"] is False and result["privacy_gain"] == 0.4


def test_target_missed_when_every_point_loses_accuracy(bench: Any) -> None:
    result = bench.target([_p(0.70, 0.95)], _p(0.83, 0.0))
    assert result["met"] is False and result["best_point"] is None
