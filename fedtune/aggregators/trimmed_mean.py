"""Coordinate-wise trimmed mean, a Byzantine-robust aggregator."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate
from fedtune.aggregators.batch import UpdateBatch
from fedtune.aggregators.registry import register_aggregator

logger = logging.getLogger(__name__)


@register_aggregator("trimmed-mean")
@dataclass(frozen=True, kw_only=True)
class TrimmedMean(Aggregator):
    """Coordinate-wise mean after dropping the ``k`` largest and ``k`` smallest values.

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
    ICML 2018, https://arxiv.org/abs/1803.01498 (the beta-trimmed mean). ``k = floor(beta * n)``
    for ``n`` clients; unweighted, like the paper. ``beta < 0.5`` guarantees ``n - 2k >= 1``
    values remain; when ``k`` rounds down to 0 the rule is a plain mean and a warning is logged.

    Attributes
    ----------
    trim_fraction:
        beta, the fraction trimmed at each end, in ``[0, 0.5)`` (config ``aggregator.options.trim-fraction``).
    """

    trim_fraction: float = 0.1

    permutation_invariant: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.trim_fraction, bool) or not isinstance(self.trim_fraction, int | float):
            raise ValueError(f"trim_fraction must be a number, got {self.trim_fraction!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(
                f"trim_fraction (aggregator.options.trim-fraction) must be in [0, 0.5), "
                f"got {self.trim_fraction}; it is the fraction of clients dropped at EACH end, "
                "so 0.5 would drop everyone"
            )

    def num_trimmed(self, num_clients: int) -> int:
        """``k``: how many values are dropped at each end for ``num_clients`` clients."""
        # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from rounding down to 28.
        return math.floor(self.trim_fraction * num_clients + 1e-9)

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        """Return the per-coordinate trimmed mean of every array."""
        batch = UpdateBatch(updates, aggregator=self.name, server_round=server_round)
        n = len(batch)
        k = self.num_trimmed(n)
        if n - 2 * k < 1:  # unreachable for trim_fraction < 0.5; kept as a guard for subclasses
            raise ValueError(f"trimmed-mean: trimming {k} of {n} clients at each end leaves none")
        if k == 0 and self.trim_fraction > 0:
            logger.warning(
                "trimmed-mean round %d: trim_fraction=%s trims nothing with %d clients (a plain mean); "
                "sample at least %d clients for it to trim",
                server_round,
                self.trim_fraction,
                n,
                math.ceil(1 / self.trim_fraction),
            )
        out = {}
        for name in batch.names:
            ordered = np.sort(batch.stack(name), axis=0)
            out[name] = ordered[k : n - k].mean(axis=0)
        return batch.to_global(out)
