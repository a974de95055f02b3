"""The server's posterior-mean denoiser: the MMSE estimate of a noised token embedding under the
d_chi mechanism, as post-processing in front of the trunk."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedtune.aggregators import create_aggregator
from fedtune.algorithms.registry import create_algorithm
from fedtune.flower.testing import run_local
from fedtune.sap.denoise import ROWS_PER_CHUNK, PosteriorMeanDenoiser
from fedtune.sap.options import SAPOptions
from fedtune.sap.split import build_split


def _vocab(v: int = 50, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


def test_posterior_mean_is_the_softmax_weighted_vocabulary() -> None:
    emb = _vocab()
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = PosteriorMeanDenoiser(emb, 2.0)(x, mask)
    for b, s in [(0, 0), (0, 2), (1, 1)]:
        w = torch.softmax(-2.0 * (x[b, s] - emb).norm(dim=-1), dim=0)
        torch.testing.assert_close(out[b, s], w @ emb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1, 2], x[1, 2], rtol=0, atol=0)  # padding passes through untouched


def test_low_noise_recovers_the_token_and_no_information_gives_the_vocabulary_mean() -> None:
    emb = _vocab()
    ids = torch.tensor([[3, 17, 42]])
    clean = emb[ids]
    mask = torch.ones_like(ids)
    sharp = PosteriorMeanDenoiser(emb, 1e4)(clean + 1e-3, mask)
    torch.testing.assert_close(sharp, clean, rtol=0, atol=1e-2)
    flat = PosteriorMeanDenoiser(emb, 1e-9)(clean, mask)
    torch.testing.assert_close(flat, emb.mean(0).expand_as(clean), rtol=0, atol=1e-5)


def test_denoising_brings_noised_embeddings_closer_to_the_clean_ones() -> None:
    """At a noise level where nearest-token search is often wrong, the posterior mean still beats the raw
    released value in squared error (it is the MMSE estimator), over many more rows than one chunk."""
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(200, 32, generator=g) / 32**0.5  # unit-norm-ish embeddings
    eta = 8.0
    ids = torch.randint(0, 200, (4, ROWS_PER_CHUNK), generator=g)
    clean = emb[ids]
    direction = torch.nn.functional.normalize(torch.randn(clean.shape, generator=g), dim=-1)
    # Gamma(32, 1/eta) = chi-square(64) / (2 eta), from the explicit generator; E||n|| = 4
    radius = torch.randn(*clean.shape[:2], 64, generator=g).pow(2).sum(-1, keepdim=True) / (2 * eta)
    noised = clean + direction * radius
    out = PosteriorMeanDenoiser(emb, eta)(noised, torch.ones_like(ids))
    raw_err = (noised - clean).pow(2).sum(-1).mean()
    den_err = (out - clean).pow(2).sum(-1).mean()
    assert den_err < 0.25 * raw_err


def test_gradients_flow_through_the_denoiser() -> None:
    emb = _vocab()
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    PosteriorMeanDenoiser(emb, 1.0)(x, torch.ones(1, 4)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PosteriorMeanDenoiser(torch.zeros(5), 1.0), "vocabulary >= 2, dim"),
        (lambda: PosteriorMeanDenoiser(_vocab(), 0.0), "finite number > 0"),
        (lambda: PosteriorMeanDenoiser(_vocab(), float("inf")), "finite number > 0"),
        (lambda: PosteriorMeanDenoiser(_vocab(), 1.0)(torch.zeros(1, 2, 8), torch.ones(1, 2)), "depth 0"),
        (lambda: PosteriorMeanDenoiser(_vocab(), 1.0)(torch.zeros(1, 2, 16), torch.ones(1, 3)), "mask"),
    ],
)
def test_bad_inputs_are_refused(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_the_trunk_denoises_float_inputs_only_at_depth_zero() -> None:
    parts = build_split("minilm-l6", "classification", 0, num_layers=2, num_classes=2, seed=0)
    emb = parts.bottom.embedding_matrix
    ids = torch.tensor([[101, 2307, 3185, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = parts.trunk(parts.bottom(ids, mask), mask)
        parts.trunk.denoise_inputs(PosteriorMeanDenoiser(emb, 1e5))
        # Exact embeddings under a sharp posterior denoise to themselves: same features.
        torch.testing.assert_close(parts.trunk(parts.bottom(ids, mask), mask), plain, rtol=0, atol=1e-4)
    assert not any(k.startswith("denoiser") for k in parts.trunk.state_dict())  # not checkpointed state
    deep = build_split("minilm-l6", "classification", 1, num_layers=2, num_classes=2, seed=0)
    with pytest.raises(ValueError, match="depth 0"):
        deep.trunk.denoise_inputs(PosteriorMeanDenoiser(emb, 1.0))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"algorithm.options.denoise": "wiener"}, "not one of none, posterior-mean"),
        ({"algorithm.options.variant": "text"}, "needs privatize = true, variant = 'embedding'"),
        ({"algorithm.options.privatize": False}, "needs privatize = true"),
        ({"algorithm.options.depth": 1}, "depth = 0"),
    ],
)
def test_denoise_option_is_checked(sap_cfg: Any, extra: dict[str, Any], match: str) -> None:
    options = {"algorithm.options.denoise": "posterior-mean", **extra}
    with pytest.raises(ValueError, match=match):
        create_algorithm(sap_cfg(**options))


def test_a_denoised_split_round_completes_on_the_grid(sap_cfg: Any) -> None:
    cfg = sap_cfg(**{"algorithm.options.denoise": "posterior-mean", "federation.num-rounds": 1})
    summary, _ = run_local(cfg)
    assert summary["completed_rounds"] == 1


@pytest.mark.parametrize(("cti", "expected"), [(False, 300.0), (True, 60.0)])
def test_under_cti_the_server_posterior_takes_the_floor_eta(sap_cfg: Any, cti: bool, expected: float) -> None:
    """The per-token etas are the client's secret; the floor's is the level most tokens get."""
    assert SAPOptions(eta=300.0, cti=cti, cti_floor=0.2).denoise_eta == pytest.approx(expected)
    cfg = sap_cfg(
        **{
            "algorithm.options.denoise": "posterior-mean",
            "algorithm.options.eta": 300.0,
            "algorithm.options.cti": cti,
            "algorithm.options.cti-floor": 0.2,
        }
    )
    server = create_algorithm(cfg).server(create_aggregator(cfg.aggregator.name, {}))
    try:
        denoiser = server.trainer.trunk.denoiser
        assert isinstance(denoiser, PosteriorMeanDenoiser) and denoiser.eta == pytest.approx(expected)
    finally:
        server.close()
