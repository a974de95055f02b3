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


def test_draws_leave_the_global_generators_alone() -> None:
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state(legacy=True)
    g = SecureGaussian()
    g.normal(1000, 1.0), g.scalar(2.0), g.normal_like(torch.zeros(10), 1.0), g.uniform(10)
    assert torch.equal(torch_state, torch.random.get_rng_state())
    after = np.random.get_state(legacy=True)
    assert np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]  # type: ignore[index]


def test_normal_like_follows_dtype_and_scalar_and_uniform_work() -> None:
    g = SecureGaussian()
    for dtype in (torch.float64, torch.bfloat16):
        n = g.normal_like(torch.zeros(2, 3, dtype=dtype), 0.5)
        assert n.dtype == dtype and n.shape == (2, 3)
    assert g.scalar(0.0) == 0.0 and isinstance(g.scalar(1.0), float)
    u = g.uniform(100_000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    with pytest.raises(ValueError):
        g.uniform(-1)
