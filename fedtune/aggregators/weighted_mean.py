"""FedAvg's example-weighted mean, the default aggregator; equal weights as an option."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate
from fedtune.aggregators.batch import Float64Array, UpdateBatch
from fedtune.aggregators.registry import register_aggregator

WEIGHTINGS = ("examples", "equal")


@register_aggregator("weighted-mean")
@dataclass(frozen=True, kw_only=True)
class WeightedMean(Aggregator):
    """Mean of the client updates weighted by ``num_examples`` (FedAvg), or with equal weights.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017, https://arxiv.org/abs/1602.05629. Not robust: one client can move the result
    arbitrarily far, and the weights are self-reported.

    Attributes
    ----------
    weighting:
        ``examples`` (weight ``n_i``, FedAvg) or ``equal`` (plain mean, as the FedKSeed reference
        code also offers: no client counts more for holding more data, and self-reported counts
        stop mattering). Config ``aggregator.options.weighting``.
    """

    weighting: str = "examples"

    permutation_invariant: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"weighting (aggregator.options.weighting) must be one of {', '.join(WEIGHTINGS)}; "
                f"got {self.weighting!r}"
            )

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        """Return ``sum_i w_i x_i / sum_i w_i`` per array (``w_i = n_i`` or 1), accumulated in float64."""
        batch = UpdateBatch(updates, aggregator=self.name, server_round=server_round)
        weights = batch.weights() if self.weighting == "examples" else np.ones(len(batch), dtype=np.float64)
        return batch.to_global(weighted_sum(batch, weights, divisor=float(weights.sum())))


def weighted_sum(
    batch: UpdateBatch, coefficients: Float64Array, *, divisor: float
) -> dict[str, Float64Array]:
    """``sum_i c_i x_i / divisor`` per array of ``batch`` (coefficients in canonical order), in float64.

    Accumulates one client at a time so memory stays at one float64 copy of the arrays; dividing
    once at the end keeps a lone client's update exact.
    """
    out: dict[str, Float64Array] = {}
    for name in batch.names:
        acc = np.zeros(batch.shapes[name], dtype=np.float64)
        for c, upd in zip(coefficients, batch.updates, strict=True):
            acc += c * upd.arrays[name].astype(np.float64)
        out[name] = acc / divisor
    return out
