"""SecureGaussian: the right distribution, independent streams, no global RNG, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedtune.privacy import SecureGaussian


def test_draws_are_normal_with_the_asked_std() -> None:
    x = SecureGaussian().normal(1_000_000, 2.5)
    assert abs(x.mean()) < 0.01 and x.std() == pytest.approx(2.5, rel=0.005)
    assert stats.kstest(x[:20000] / 2.5, "norm").pvalue > 0.001


def test_two_generators_give_different_streams_and_odd_sizes_work() -> None:
    a, b = SecureGaussian().normal(7, 1.0), SecureGaussian().normal(7, 1.0)
    assert a.shape == (7,) and not np.array_equal(a, b)
    g = SecureGaussian()
    assert not np.array_equal(g.normal(5, 1.0), g.normal(5, 1.0))  # the stream moves on


def test_zero_std_gives_zeros_and_bad_std_is_refused() -> None:
    g = SecureGaussian()
    assert not g.normal(4, 0.0).any()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="std"):
            g.normal(3, bad)


def test_normal_like_keeps_shape_and_dtype() -> None:
    t = torch.zeros(3, 4, dtype=torch.float32)
    n = SecureGaussian().normal_like(t, 1.0)
    assert n.shape == t.shape and n.dtype == torch.float32 and n.abs().sum() > 0
