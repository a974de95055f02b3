"""Norm-clipped weighted mean, which bounds any single client's influence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate
from fedtune.aggregators.batch import Float64Array, UpdateBatch
from fedtune.aggregators.registry import register_aggregator
from fedtune.aggregators.weighted_mean import weighted_sum


@register_aggregator("clipped-mean")
@dataclass(frozen=True, kw_only=True)
class ClippedMean(Aggregator):
    """Clip each client's whole update to L2 norm ``C``, then take the example-weighted mean.

    The per-client clipping of DP-FedAvg: McMahan et al., "Learning Differentially Private
    Recurrent Language Models", ICLR 2018, https://arxiv.org/abs/1710.06963 (without the noise;
    compose a DP mechanism separately). ``clip_norm == 0`` picks ``C`` adaptively as the median
    client norm of the round, a non-private, exact version of the quantile clipping of Andrew
    et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021,
    https://arxiv.org/abs/1905.03871. Clipping is around zero, not around a running centre as in
    Karimireddy et al.'s centered clipping (ICML 2021), so the arrays must be *deltas* (FedKSeed
    coefficients, LoRA weight changes), never absolute weights.

    Attributes
    ----------
    clip_norm:
        ``C`` >= 0 (config ``aggregator.options.clip-norm``); 0 means "median client norm this round".
    """

    clip_norm: float = 0.0

    permutation_invariant: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.clip_norm, bool) or not isinstance(self.clip_norm, int | float):
            raise ValueError(f"clip_norm must be a number, got {self.clip_norm!r}")
        if not (np.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(
                f"clip_norm (aggregator.options.clip-norm) must be a finite number >= 0, "
                f"got {self.clip_norm}; use 0 for the adaptive (median-norm) bound"
            )

    def clip_factors(self, norms: Float64Array) -> Float64Array:
        """Per-client scale ``min(1, C / norm)`` (1 for zero-norm updates)."""
        bound = float(np.median(norms)) if self.clip_norm == 0 else float(self.clip_norm)
        scale = np.ones_like(norms)
        over = norms > bound
        scale[over] = bound / norms[over]
        return scale

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        """Return the weighted mean of the clipped updates."""
        batch = UpdateBatch(updates, aggregator=self.name, server_round=server_round)
        weights = batch.weights()
        coefficients = weights * self.clip_factors(batch.norms())  # sum_i n_i s_i x_i / sum_i n_i
        return batch.to_global(weighted_sum(batch, coefficients, divisor=float(weights.sum())))
