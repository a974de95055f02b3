"""Fixed-point encoding: round-trip error, NaN/Inf refusal, clip count, the overflow check."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.secagg.quantize import Quantizer


@pytest.mark.parametrize("bits", [8, 24, 40])
def test_round_trip_error_is_at_most_half_a_step(bits: int) -> None:
    q = Quantizer(bits, 8.0, 10)
    x = np.random.default_rng(bits).uniform(-8, 8, 5000)
    enc, clipped = q.encode(x)
    assert enc.dtype == np.uint64 and clipped == 0
    assert np.abs(q.decode(enc) - x).max() <= 2.0 ** -(bits + 1)


def test_sum_of_encodings_decodes_within_max_sum_error() -> None:
    q = Quantizer(20, 4.0, 7)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-4, 4, 3000) for _ in range(7)]
    total = np.zeros(3000, dtype=np.uint64)
    for x in xs:
        total += q.encode(x)[0]  # wraps modulo 2^64 for negative values
    assert np.abs(q.decode(total) - np.sum(xs, axis=0)).max() <= q.max_sum_error(7)
    assert q.max_sum_error(7) == 7 * 2.0**-21


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_rejected(bad: float) -> None:
    x = np.zeros(10)
    x[3] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf .*position 3"):
        Quantizer(16, 1.0, 3).encode(x)


def test_clipped_coordinates_are_counted_and_clipped() -> None:
    q = Quantizer(16, 1.0, 3)
    enc, clipped = q.encode(np.array([0.5, 1.0, 1.5, -3.0, -1.0]))
    assert clipped == 2
    np.testing.assert_array_equal(q.decode(enc), [0.5, 1.0, 1.0, -1.0, -1.0])


def test_overflow_check_names_the_fix() -> None:
    Quantizer(40, 8.0, 10)  # 10 * 8 * 2^40 < 2^63
    with pytest.raises(ValueError, match="lower fraction-bits or clip, or sample fewer clients"):
        Quantizer(60, 8.0, 10)
    with pytest.raises(ValueError, match="overflows"):
        Quantizer(52, 1024.0, 2)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="fraction_bits"):
        Quantizer(63, 1.0, 2)
    with pytest.raises(ValueError, match="clip"):
        Quantizer(8, float("nan"), 2)
    with pytest.raises(ValueError, match="1-D"):
        Quantizer(8, 1.0, 2).encode(np.zeros((2, 2)))
