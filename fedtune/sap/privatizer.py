"""d_chi-privacy of token representations, the client side of SAP (Shen et al. 2023, arXiv:2312.15603).

Feyisetan et al. 2020 ("Privacy- and Utility-Preserving Textual Analysis via Calibrated Multivariate
Perturbations", WSDM) make a mechanism ``eta``-d_chi-private over a metric space by adding noise with
density ``p(n) ∝ exp(-eta ||n||_2)``: an adversary's ability to tell two inputs apart decays with ``eta``
times their distance. In R^d that noise is a uniform direction times a norm ``r ~ Gamma(d, 1/eta)``, so
``E||n|| = d/eta``.

Where the noise is added sets the meaning of eta. d_chi-privacy is defined over the embedding space, so for
the embedding split SAP noises the token embeddings before position embeddings and normalization; eta is then
relative to the spread of the vocabulary's embeddings (``NoiseStats.noised_norm`` reports their scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.sap.noise import SecureNormal


@dataclass(frozen=True)
class NoiseStats:
    """What one privatization did, for logs: eta only means something next to ``noised_norm``."""

    tokens: int  # non-pad positions noised (finite eta)
    noised_norm: float  # mean L2 norm of h_i over those positions
    noise_norm: float  # mean L2 norm of n_i over those positions (E = d/eta)


def _noise_rows(etas: np.ndarray, dim: int, rng: SecureNormal) -> np.ndarray:
    """(k, dim) float64 d_chi noise, one independent draw per entry of the finite, positive ``etas``.

    Direction: a d-dim standard normal, normalized (uniform on the sphere). Norm: Gamma(d, 1/eta), drawn per
    token (sharing one Gamma draw across a batch, a bug in public code, correlates all tokens' noise). For
    integer d, Gamma(d, 1) = ||g||^2 / 2 with g ~ N(0, I_2d), so every bit of randomness is from ``rng``.
    """
    k = etas.shape[0]
    g = rng.normal(3 * dim * k).reshape(k, 3 * dim)
    direction = g[:, :dim]
    lengths = np.linalg.norm(direction, axis=1)
    while (zero := np.flatnonzero(lengths == 0.0)).size:  # probability ~2^-53 per token, and only for d = 1
        direction[zero] = rng.normal(zero.size * dim).reshape(zero.size, dim)
        lengths[zero] = np.linalg.norm(direction[zero], axis=1)
    chi2 = np.einsum("ij,ij->i", g[:, dim:], g[:, dim:])  # ~ chi-square with 2d degrees of freedom
    radius = chi2 / (2.0 * etas)
    result: np.ndarray = direction * (radius / lengths)[:, None]
    return result


def _check_etas(values: torch.Tensor, what: str) -> None:
    if torch.isnan(values).any() or (values <= 0).any():
        bad = values[torch.isnan(values) | (values <= 0)][0].item()
        raise ValueError(f"{what} must be > 0 (math.inf for no noise), got {bad}")


def dchi_noise(etas: torch.Tensor, dim: int, rng: SecureNormal) -> torch.Tensor:
    """Noise (B, S, dim) float32 on ``etas``' device, ``p(n_i) ∝ exp(-etas[i] ||n_i||)``, iid per position.

    ``E||n_i|| = dim / etas[i]``; positions with ``eta = math.inf`` get exactly zero noise.
    """
    if not isinstance(etas, torch.Tensor) or etas.ndim != 2 or not etas.is_floating_point():
        raise ValueError("etas must be a floating (B, S) tensor")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    flat = etas.detach().to("cpu", torch.float64).reshape(-1)
    _check_etas(flat, "etas")
    finite = torch.isfinite(flat)
    noise = torch.zeros(flat.shape[0], dim, dtype=torch.float32)
    if finite.any():
        rows = _noise_rows(flat[finite].numpy(), dim, rng)
        noise[finite] = torch.from_numpy(rows).to(torch.float32)
    return noise.reshape(*etas.shape, dim).to(etas.device)


class DChiPrivatizer:
    """d_chi privatization of token representations; reference Feyisetan et al., WSDM 2020, and SAP.

    ``h~_i = h_i + n_i`` with ``p(n_i) ∝ exp(-eta_i ||n_i||_2)`` for every non-pad position, independently;
    ``E||n_i|| = d / eta_i``, so larger eta means less noise and less privacy. Where the noise is added sets
    the meaning of eta: for the embedding split, on the token embeddings before position embeddings and
    normalization, since d_chi-privacy is defined over the embedding space.

    ``rng=None`` draws a fresh random key; pass a keyed ``SecureNormal`` only in tests.
    """

    def __init__(self, eta: float, *, rng: SecureNormal | None = None) -> None:
        if isinstance(eta, bool) or not isinstance(eta, int | float):
            raise ValueError(f"eta must be a number, got {type(eta).__name__}")
        if not math.isfinite(eta) or eta <= 0:
            raise ValueError(
                f"eta must be finite and > 0, got {eta} (E||n|| = d/eta: raise eta for less noise; "
                "to leave positions un-noised pass per-token etas with math.inf there)"
            )
        self.eta = float(eta)
        self.rng = SecureNormal() if rng is None else rng

    def __call__(
        self, h: torch.Tensor, attention_mask: torch.Tensor, etas: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, NoiseStats]:
        """Noised ``h`` in h's dtype (added in at least float32) and what was done.

        ``h`` (B, S, d) floating; ``attention_mask`` (B, S) of 0/1; ``etas`` (B, S) per-token budgets (None:
        ``self.eta`` everywhere; values at pad positions are ignored). Pad positions and positions with
        ``eta = math.inf`` are returned bit-identical. Differentiable in ``h`` (the noise is a constant).
        """
        if not isinstance(h, torch.Tensor) or h.ndim != 3 or not h.is_floating_point():
            raise ValueError("h must be a floating (B, S, d) tensor")
        batch_shape = tuple(h.shape[:2])
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != batch_shape:
            raise ValueError(f"attention_mask must be a (B, S) = {batch_shape} tensor")
        mask = attention_mask.detach().cpu()
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        active = mask != 0
        if etas is None:
            eta_all = torch.full(batch_shape, self.eta, dtype=torch.float64)
        else:
            if not isinstance(etas, torch.Tensor) or tuple(etas.shape) != batch_shape:
                raise ValueError(f"etas must be a (B, S) = {batch_shape} tensor or None")
            if not etas.is_floating_point():
                raise ValueError(f"etas must be floating, got {etas.dtype}")
            eta_all = etas.detach().to("cpu", torch.float64)
            _check_etas(eta_all[active], "etas at non-pad positions")
        noised = active & torch.isfinite(eta_all)
        tokens = int(noised.sum())
        if tokens == 0:
            return h.clone(), NoiseStats(tokens=0, noised_norm=0.0, noise_norm=0.0)

        dim = h.shape[2]
        rows = torch.from_numpy(_noise_rows(eta_all[noised].numpy(), dim, self.rng))
        compute = torch.promote_types(h.dtype, torch.float32)
        noise = torch.zeros(*batch_shape, dim, dtype=compute)
        noise[noised] = rows.to(compute)
        noised_dev = noised.to(h.device)
        out = torch.where(noised_dev[..., None], (h.to(compute) + noise.to(h.device)).to(h.dtype), h)
        stats = NoiseStats(
            tokens=tokens,
            noised_norm=float(h.detach()[noised_dev].to(compute).norm(dim=1).mean()),
            noise_norm=float(rows.norm(dim=1).mean()),
        )
        return out, stats


def snap_to_vocab(
    noised: torch.Tensor,
    embedding: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    chunk: int = 4096,
) -> torch.Tensor:
    """Text-level variant: each non-pad position -> id of the nearest vocabulary embedding (L2).

    Feyisetan et al. release words, not vectors: the noised embedding is replaced by its nearest neighbour in
    ``embedding`` (V, d). Distances are computed ``chunk`` positions at a time (peak ``chunk * V`` floats:
    4096 x 49152 x 4 bytes = 0.8 GB for SmolLM2, so lower ``chunk`` on small machines). Pad positions keep
    ``input_ids``. Returns (B, S) int64 on ``input_ids``' device.
    """
    if not isinstance(noised, torch.Tensor) or noised.ndim != 3 or not noised.is_floating_point():
        raise ValueError("noised must be a floating (B, S, d) tensor")
    if not isinstance(embedding, torch.Tensor) or embedding.ndim != 2 or not embedding.is_floating_point():
        raise ValueError("embedding must be a floating (V, d) tensor")
    if embedding.shape[1] != noised.shape[2] or embedding.shape[0] == 0:
        raise ValueError(
            f"embedding must have >= 1 row of d = {noised.shape[2]}, got {tuple(embedding.shape)}"
        )
    batch_shape = tuple(noised.shape[:2])
    for name, t in (("attention_mask", attention_mask), ("input_ids", input_ids)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != batch_shape:
            raise ValueError(f"{name} must be a (B, S) = {batch_shape} tensor")
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must be integer, got {input_ids.dtype}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")

    out = input_ids.detach().to(torch.int64).clone()
    active = attention_mask.detach().to(noised.device) != 0
    with torch.no_grad():
        compute = torch.promote_types(torch.promote_types(noised.dtype, embedding.dtype), torch.float32)
        vocab = embedding.detach().to(noised.device, compute)
        rows = noised.detach()[active].to(compute)
        nearest = torch.empty(rows.shape[0], dtype=torch.int64, device=noised.device)
        for start in range(0, rows.shape[0], chunk):
            part = rows[start : start + chunk]
            nearest[start : start + chunk] = torch.cdist(part, vocab).argmin(dim=1)
    out[active.to(out.device)] = nearest.to(out.device)
    return out
