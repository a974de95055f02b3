"""Server-side denoising of d_chi-noised token embeddings: the posterior mean over the vocabulary.

With the embedding split, the trunk receives ``y = e_t + n`` with ``p(n) ∝ exp(-eta ||n||)``
(:mod:`fedtune.sap.privatizer`). Fed to the trunk as is, ``y`` is far off the embedding manifold
(the noise norm ``d / eta`` is several times an embedding's), and LoRA on the attention
projections cannot learn to undo it: on MiniLM the embedding split falls to near chance at noise
levels where nearest-token search still recovers 99% of the tokens
(``benchmarks/results/sap_privacy.json``). The Bayes-optimal (minimum squared error) estimate of
``e_t`` given ``y`` under a uniform prior over the vocabulary is

    E[e_t | y] = sum_v softmax_v(-eta ||y - e_v||) e_v,

a convex combination of vocabulary embeddings, which the trunk has seen in pre-training. It is
post-processing of what the client released, so the d_chi guarantee is unchanged, and its
argmax (the maximum a posteriori token) is exactly nearest-token inversion, which the privacy
benchmark already runs as an attack. No library computes this posterior: it is one
softmax-weighted matmul, written here.

Under CTI each token's eta depends on the client's private label statistics, which the server
does not know; the posterior then uses the floor's eta (``SAPOptions.denoise_eta``), the level most
tokens get, an approximation (under-confident for the contributing tokens given less noise).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

ROWS_PER_CHUNK = 256
"""Token rows per distance matrix: 256 x vocabulary floats (31 MB for MiniLM's 30,522 tokens)."""


class PosteriorMeanDenoiser(nn.Module):
    """``E[e_t | y]`` for every non-pad position, under the d_chi mechanism at ``eta`` and a uniform
    prior over the rows of ``embeddings``; padding positions pass through untouched.

    Reference: the mechanism of Feyisetan et al. (WSDM 2020) as used by SAP (Shen et al. 2023,
    arXiv:2312.15603); the estimator is the posterior mean (MMSE) of the released value.
    """

    def __init__(self, embeddings: torch.Tensor, eta: float) -> None:
        super().__init__()
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or embeddings.shape[0] < 2:
            raise ValueError("embeddings must be a (vocabulary >= 2, dim) tensor of token embeddings")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
            raise ValueError(f"eta must be a finite number > 0 (the privatizer's base eta), got {eta!r}")
        self.eta = float(eta)
        # Not persistent: it is the frozen vocabulary, rebuilt with the model, not trunk state to checkpoint.
        self.register_buffer("embeddings", embeddings.detach().float().clone(), persistent=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = cast(torch.Tensor, self.embeddings)
        if x.ndim != 3 or x.shape[-1] != emb.shape[1]:
            raise ValueError(
                f"expected (batch, seq, {emb.shape[1]}) token embeddings, got {tuple(x.shape)}; "
                "the posterior-mean denoiser applies to the embedding split (depth 0) only"
            )
        if attention_mask.shape != x.shape[:2]:
            raise ValueError(
                f"attention mask {tuple(attention_mask.shape)} does not match {tuple(x.shape[:2])}"
            )
        keep = attention_mask.bool()
        rows = x[keep].float()
        means = [
            torch.softmax(-self.eta * torch.cdist(chunk, emb), dim=-1) @ emb
            for chunk in torch.split(rows, ROWS_PER_CHUNK)
        ]
        out = x.clone()
        if means:
            out[keep] = torch.cat(means).to(x.dtype)
        return out
