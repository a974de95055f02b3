"""d_chi noise: the norm law, direction uniformity, per-token independence, padding and per-token etas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedtune.sap.noise import SecureNormal
from fedtune.sap.privatizer import DChiPrivatizer, NoiseStats, dchi_noise, snap_to_vocab


def rng(i: int = 0) -> SecureNormal:
    return SecureNormal(bytes((i + j) % 256 for j in range(32)))


def data(shape: tuple[int, ...], i: int = 0) -> torch.Tensor:
    """Deterministic test inputs (not noise) from a keyed stream, never the global RNG."""
    return torch.from_numpy(rng(100 + i).normal(math.prod(shape)).reshape(shape)).to(torch.float32)


@pytest.mark.parametrize(("dim", "eta"), [(16, 4.0), (384, 50.0)])
def test_noise_norms_follow_gamma(dim: int, eta: float) -> None:
    noise = dchi_noise(torch.full((40, 50), eta), dim, rng())
    assert noise.shape == (40, 50, dim) and noise.dtype == torch.float32
    norms = noise.reshape(-1, dim).double().norm(dim=1).numpy()
    assert stats.kstest(norms, stats.gamma(a=dim, scale=1 / eta).cdf).pvalue > 0.01


@pytest.mark.parametrize("dim", [3, 64])
def test_directions_are_uniform(dim: int) -> None:
    noise = dchi_noise(torch.full((50, 40), 2.0), dim, rng(1)).reshape(-1, dim).double()
    u = noise / noise.norm(dim=1, keepdim=True)
    n = u.shape[0]
    assert u.mean(dim=0).norm() < 3 / math.sqrt(n)  # E||mean u||^2 = 1/n
    cos = (u[:-1] * u[1:]).sum(dim=1)  # neighbouring tokens
    assert abs(cos.mean()) < 4 / math.sqrt(dim * (n - 1))
    # E|cos| between independent uniform directions on S^(d-1) = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)).
    expected = math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
    assert cos.abs().mean().item() == pytest.approx(expected, rel=0.1)


def test_norms_within_a_batch_are_independent_draws() -> None:
    dim, eta = 16, 2.0
    noise = dchi_noise(torch.full((40, 100), eta), dim, rng(2))
    norms = noise.reshape(-1, dim).double().norm(dim=1)
    assert norms.unique().numel() == norms.numel()
    # Regression: one Gamma draw shared across the batch gives (near) zero within-batch variance.
    assert abs(norms.var().item() / (dim / eta**2) - 1) < 0.1
    assert abs(norms.mean().item() / (dim / eta) - 1) < 0.02


def test_norms_uncorrelated_across_positions_over_batches() -> None:
    dim, eta = 8, 1.0
    privatize = DChiPrivatizer(eta, rng=rng(3))
    h = torch.zeros(2, 4, dim)
    mask = torch.ones(2, 4, dtype=torch.long)
    per_batch = []
    for _ in range(400):
        out, _ = privatize(h, mask)
        per_batch.append(out.reshape(-1, dim).norm(dim=1))
    norms = torch.stack(per_batch).double().numpy()  # (batches, positions)
    corr = np.corrcoef(norms, rowvar=False)
    off_diagonal = corr[~np.eye(corr.shape[0], dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.2  # std ~ 1/sqrt(400) = 0.05
    assert abs(off_diagonal.mean()) < 0.03


def test_padding_is_bit_identical() -> None:
    h = data((3, 7, 32)).to(torch.bfloat16)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])
    out, stats_ = DChiPrivatizer(5.0, rng=rng(4))(h, mask)
    assert out.dtype == torch.bfloat16 and out.shape == h.shape
    pads = mask == 0
    assert torch.equal(out[pads], h[pads])
    assert not torch.equal(out[~pads], h[~pads])
    assert (out[~pads] != h[~pads]).any(dim=1).all()
    assert stats_.tokens == int(mask.sum())


def test_all_pad_batch_returns_input() -> None:
    h = data((2, 5, 8))
    out, stats_ = DChiPrivatizer(1.0, rng=rng(5))(h, torch.zeros(2, 5))
    assert torch.equal(out, h)
    assert stats_ == NoiseStats(tokens=0, noised_norm=0.0, noise_norm=0.0)


def test_noise_stats_values() -> None:
    h = data((4, 6, 24)) * 3
    mask = torch.ones(4, 6)
    mask[1, 3:] = 0
    out, stats_ = DChiPrivatizer(8.0, rng=rng(6))(h, mask)
    keep = mask != 0
    assert stats_.tokens == int(keep.sum())
    assert stats_.noised_norm == pytest.approx(h[keep].norm(dim=1).mean().item(), rel=1e-6)
    assert stats_.noise_norm == pytest.approx((out - h)[keep].norm(dim=1).mean().item(), rel=1e-4)


def test_per_token_etas_inf_means_no_noise() -> None:
    h = data((2, 4, 16))
    mask = torch.ones(2, 4)
    etas = torch.full((2, 4), 3.0)
    etas[0, 1] = math.inf
    etas[1, 3] = math.inf
    out, stats_ = DChiPrivatizer(1.0, rng=rng(7))(h, mask, etas)
    clean = torch.isinf(etas)
    assert torch.equal(out[clean], h[clean])
    assert (out[~clean] != h[~clean]).any(dim=1).all()
    assert stats_.tokens == 6
    assert stats_.noised_norm == pytest.approx(h[~clean].norm(dim=1).mean().item(), rel=1e-6)


def test_larger_eta_gives_proportionally_smaller_noise() -> None:
    dim = 64
    h = torch.zeros(2, 1000, dim)
    etas = torch.tensor([[8.0], [32.0]]).expand(2, 1000)
    out, _ = DChiPrivatizer(1.0, rng=rng(8))(h, torch.ones(2, 1000), etas)
    mean_norm = out.norm(dim=2).mean(dim=1)
    assert mean_norm[0] > mean_norm[1]
    for row, eta in ((0, 8.0), (1, 32.0)):
        assert mean_norm[row].item() == pytest.approx(dim / eta, rel=0.03)


def test_etas_at_pad_positions_are_ignored() -> None:
    h = data((1, 3, 4))
    mask = torch.tensor([[1, 1, 0]])
    out, _ = DChiPrivatizer(1.0, rng=rng(9))(h, mask, torch.tensor([[2.0, 2.0, 0.0]]))
    assert torch.equal(out[0, 2], h[0, 2])


def test_gradient_flows_through_the_noise() -> None:
    h = data((1, 3, 4)).requires_grad_()
    out, _ = DChiPrivatizer(1.0, rng=rng(10))(h, torch.tensor([[1, 1, 0]]))
    out.sum().backward()
    assert h.grad is not None and torch.equal(h.grad, torch.ones_like(h))


def test_same_key_same_noise() -> None:
    h = data((2, 3, 8))
    mask = torch.ones(2, 3)
    a, _ = DChiPrivatizer(1.0, rng=rng(11))(h, mask)
    b, _ = DChiPrivatizer(1.0, rng=rng(11))(h, mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("eta", [0.0, -1.0, math.inf, math.nan])
def test_bad_eta_raises(eta: float) -> None:
    with pytest.raises(ValueError, match="finite and > 0"):
        DChiPrivatizer(eta)


def test_bad_shapes_and_etas_raise() -> None:
    privatize = DChiPrivatizer(1.0, rng=rng(12))
    h = torch.zeros(2, 3, 4)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="h must be"):
        privatize(torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match="attention_mask"):
        privatize(h, torch.ones(3, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        privatize(h, mask * 2)
    with pytest.raises(ValueError, match="etas must be"):
        privatize(h, mask, torch.ones(2, 4))
    with pytest.raises(ValueError, match="> 0"):
        privatize(h, mask, torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="> 0"):
        dchi_noise(torch.tensor([[1.0, math.nan]]), 4, rng())
    with pytest.raises(ValueError, match="> 0"):
        dchi_noise(torch.tensor([[-1.0]]), 4, rng())
    with pytest.raises(ValueError, match="dim"):
        dchi_noise(torch.ones(1, 1), 0, rng())
    assert torch.equal(dchi_noise(torch.full((1, 2), math.inf), 4, rng()), torch.zeros(1, 2, 4))


def vocab_setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embedding = data((50, 8), 1)
    ids = torch.tensor([[3, 7, 7, 49, 0], [12, 0, 5, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    return embedding, ids, mask


def test_snap_with_tiny_noise_returns_the_tokens() -> None:
    embedding, ids, mask = vocab_setup()
    noised, _ = DChiPrivatizer(1e6, rng=rng(13))(embedding[ids], mask)
    snapped = snap_to_vocab(noised, embedding, mask, ids)
    assert snapped.dtype == torch.int64
    assert torch.equal(snapped, ids)


def test_snap_keeps_pad_ids_and_chunking_changes_nothing() -> None:
    embedding, ids, mask = vocab_setup()
    noised, _ = DChiPrivatizer(2.0, rng=rng(14))(embedding[ids], mask)
    pad_ids = torch.where(mask == 0, torch.full_like(ids, 42), ids)
    whole = snap_to_vocab(noised, embedding, mask, pad_ids)
    assert torch.equal(whole[mask == 0], pad_ids[mask == 0])
    assert not torch.equal(whole[mask == 1], ids[mask == 1])  # this much noise moves some tokens
    brute = torch.cdist(noised[mask == 1], embedding).argmin(dim=1)
    assert torch.equal(whole[mask == 1], brute)
    for chunk in (1, 2, 3):
        assert torch.equal(snap_to_vocab(noised, embedding, mask, pad_ids, chunk=chunk), whole)


def test_snap_bad_inputs_raise() -> None:
    embedding, ids, mask = vocab_setup()
    noised = embedding[ids]
    with pytest.raises(ValueError, match="embedding"):
        snap_to_vocab(noised, embedding[:, :4], mask, ids)
    with pytest.raises(ValueError, match="input_ids"):
        snap_to_vocab(noised, embedding, mask, ids[:, :3])
    with pytest.raises(ValueError, match="chunk"):
        snap_to_vocab(noised, embedding, mask, ids, chunk=0)
