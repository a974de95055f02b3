"""Hand-computed values for weighted-mean, median, trimmed-mean and clipped-mean."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedtune.aggregators import ClientUpdate, ClippedMean, Median, TrimmedMean, WeightedMean


def _vec_updates(rows: list[list[float]], weights: list[int] | None = None) -> list[ClientUpdate]:
    weights = weights or [1] * len(rows)
    return [
        ClientUpdate(node_id=i, num_examples=w, arrays={"coefficients": np.array(r, dtype=np.float32)})
        for i, (r, w) in enumerate(zip(rows, weights, strict=True))
    ]


def _out(agg: object, updates: list[ClientUpdate], name: str = "coefficients") -> np.ndarray:
    return np.asarray(agg.aggregate(1, updates).arrays[name])  # type: ignore[attr-defined]


# --- weighted-mean ------------------------------------------------------------------------------


def test_weighted_mean_weights_by_num_examples() -> None:
    out = _out(WeightedMean(), _vec_updates([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], weights=[1, 2, 3]))
    np.testing.assert_allclose(out, [4 / 3, 4 / 3], rtol=1e-7)  # (0*1 + 1*2 + 2*3) / 6
    assert out.dtype == np.float32


def test_weighted_mean_equal_weighting_is_the_plain_mean() -> None:
    updates = _vec_updates([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], weights=[1, 2, 30])
    np.testing.assert_allclose(_out(WeightedMean(weighting="equal"), updates), [1.0, 1.0], rtol=1e-7)


def test_weighted_mean_weighting_is_validated() -> None:
    with pytest.raises(ValueError, match=r"aggregator\.options\.weighting.*examples, equal"):
        WeightedMean(weighting="uniform")


def test_weighted_mean_weighting_from_config_options() -> None:
    from fedtune.aggregators import create_aggregator

    agg = create_aggregator("weighted-mean", {"weighting": "equal"})
    assert isinstance(agg, WeightedMean) and agg.weighting == "equal"


def test_weighted_mean_accumulates_in_float64() -> None:
    # In float32, 1e8 + 1 == 1e8, so a float32 accumulator would return 0 instead of 1/3.
    out = _out(WeightedMean(), _vec_updates([[1e8], [1.0], [-1e8]]))
    np.testing.assert_allclose(out, [1 / 3], rtol=1e-7)


def test_weighted_mean_per_named_array() -> None:
    updates = [
        ClientUpdate(
            node_id=1, num_examples=1, arrays={"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
        ),
        ClientUpdate(
            node_id=2, num_examples=3, arrays={"a": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)}
        ),
    ]
    out = WeightedMean().aggregate(1, updates)
    np.testing.assert_allclose(out.arrays["a"], np.full((2, 2), 0.25))
    np.testing.assert_allclose(out.arrays["b"], np.full(3, 0.75))
    assert out.num_clients == 2


def test_weighted_mean_keeps_fedkseed_sparsity() -> None:
    k = 4096
    rows = [np.zeros(k, np.float32) for _ in range(3)]
    rows[0][[5, 17]] = [0.3, -0.1]
    rows[1][[17, 4000]] = [0.2, 0.4]
    out = _out(WeightedMean(), _vec_updates([r.tolist() for r in rows], weights=[1, 1, 2]))
    expected = np.zeros(k)
    expected[[5, 17, 4000]] = [0.3 / 4, (-0.1 + 0.2) / 4, 0.4 / 4]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-9)
    assert np.count_nonzero(out) == 3


# --- median ---------------------------------------------------------------------------------------


def test_median_is_coordinate_wise_and_unweighted() -> None:
    updates = _vec_updates([[1.0, 5.0, 2.0], [3.0, 0.0, 9.0], [2.0, 2.0, 2.0]], weights=[1000, 1, 1])
    np.testing.assert_array_equal(_out(Median(), updates), [2.0, 2.0, 2.0])


def test_median_averages_middle_pair_for_even_count() -> None:
    np.testing.assert_array_equal(_out(Median(), _vec_updates([[0.0], [10.0], [4.0], [6.0]])), [5.0])


def test_median_ignores_a_scaled_attacker() -> None:
    honest = [[1.0, -1.0], [1.1, -0.9], [0.9, -1.1]]
    out = _out(Median(), _vec_updates([*honest, [100.0, -100.0]]))
    np.testing.assert_allclose(out, [1.05, -1.05], rtol=1e-6)  # middle pairs (1, 1.1), (-1.1, -1)


# --- trimmed-mean ---------------------------------------------------------------------------------


def test_trimmed_mean_drops_k_at_each_end() -> None:
    # beta = 0.2, n = 5 -> k = 1: drop 0 and 100, mean of 1, 2, 3 (per coordinate, independently).
    rows = [[0.0, 3.0], [1.0, 100.0], [2.0, 1.0], [3.0, 0.0], [100.0, 2.0]]
    np.testing.assert_allclose(_out(TrimmedMean(trim_fraction=0.2), _vec_updates(rows)), [2.0, 2.0])


def test_trimmed_mean_zero_fraction_is_unweighted_mean() -> None:
    out = _out(TrimmedMean(trim_fraction=0.0), _vec_updates([[0.0], [1.0], [5.0]], weights=[9, 1, 1]))
    np.testing.assert_allclose(out, [2.0])


@pytest.mark.parametrize(("fraction", "n", "k"), [(0.2, 5, 1), (0.29, 100, 29), (0.1, 9, 0), (0.49, 3, 1)])
def test_trimmed_mean_count(fraction: float, n: int, k: int) -> None:
    assert TrimmedMean(trim_fraction=fraction).num_trimmed(n) == k


@pytest.mark.parametrize("fraction", [0.5, 0.7, -0.1, float("nan"), True, "0.1"])
def test_trimmed_mean_rejects_bad_fraction(fraction: object) -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(trim_fraction=fraction)  # type: ignore[arg-type]


def test_trimmed_mean_warns_when_it_trims_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedtune.aggregators.trimmed_mean"):
        TrimmedMean(trim_fraction=0.2).aggregate(3, _vec_updates([[0.0], [1.0], [2.0]]))
    assert "trims nothing with 3 clients" in caplog.text
    assert "at least 5 clients" in caplog.text


# --- clipped-mean ---------------------------------------------------------------------------------


def test_clipped_mean_clips_norm_over_all_arrays() -> None:
    # Node 1's update is a=[3], b=[4]: norm 5 over both arrays -> scaled to a=0.6, b=0.8 with C = 1.
    updates = [
        ClientUpdate(
            node_id=1,
            num_examples=1,
            arrays={"a": np.array([3.0], np.float32), "b": np.array([4.0], np.float32)},
        ),
        ClientUpdate(
            node_id=2,
            num_examples=1,
            arrays={"a": np.array([0.3], np.float32), "b": np.array([0.4], np.float32)},
        ),
    ]
    out = ClippedMean(clip_norm=1.0).aggregate(1, updates)
    np.testing.assert_allclose(out.arrays["a"], [(0.6 + 0.3) / 2], rtol=1e-6)
    np.testing.assert_allclose(out.arrays["b"], [(0.8 + 0.4) / 2], rtol=1e-6)


def test_clipped_mean_adaptive_bound_is_median_norm() -> None:
    # Norms 1, 2, 10 -> C = 2: the third is scaled by 0.2; weights 1, 1, 2.
    updates = _vec_updates([[1.0, 0.0], [0.0, 2.0], [6.0, 8.0]], weights=[1, 1, 2])
    agg = ClippedMean(clip_norm=0.0)
    np.testing.assert_allclose(agg.clip_factors(np.array([1.0, 2.0, 10.0])), [1.0, 1.0, 0.2])
    np.testing.assert_allclose(_out(agg, updates), [(1.0 + 2 * 1.2) / 4, (2.0 + 2 * 1.6) / 4], rtol=1e-6)


def test_clipped_mean_bounds_an_attacker_and_keeps_zero_updates() -> None:
    factors = ClippedMean(clip_norm=1.0).clip_factors(np.array([0.0, 0.5, 1000.0]))
    np.testing.assert_allclose(factors, [1.0, 1.0, 1e-3])
    out = _out(ClippedMean(clip_norm=1.0), _vec_updates([[0.0], [0.5], [1000.0]]))
    np.testing.assert_allclose(out, [(0.0 + 0.5 + 1.0) / 3], rtol=1e-6)


@pytest.mark.parametrize("clip", [-1.0, float("inf"), float("nan"), False])
def test_clipped_mean_rejects_bad_clip_norm(clip: object) -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        ClippedMean(clip_norm=clip)  # type: ignore[arg-type]
