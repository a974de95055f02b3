"""Krum: keep the one update closest to its neighbours, a Byzantine-robust aggregator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate
from fedtune.aggregators.batch import Float64Array, UpdateBatch
from fedtune.aggregators.registry import register_aggregator


def check_num_byzantine(num_byzantine: int) -> None:
    """Reject anything but a non-negative int for ``f`` (config ``aggregator.options.num-byzantine``)."""
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
        raise ValueError(
            f"num_byzantine (aggregator.options.num-byzantine) must be an integer >= 0, got {num_byzantine!r}"
        )


def krum_scores(batch: UpdateBatch, num_byzantine: int) -> Float64Array:
    """Krum score per update (canonical order): sum of squared distances to its ``n - f - 2`` nearest.

    Raises
    ------
    ValueError
        Unless ``n > 2f + 2``, the condition under which Krum's guarantee holds.
    """
    n, f = len(batch), num_byzantine
    if n <= 2 * f + 2:
        raise ValueError(
            f"Krum needs n > 2f + 2 updates, got n={n} with f={f} (aggregator.options.num-byzantine); "
            f"sample at least {2 * f + 3} clients per round or lower num-byzantine"
        )
    dist = np.zeros((n, n), dtype=np.float64)
    for name in batch.names:
        flat = batch.flat(name)
        for i in range(n):
            diff = flat - flat[i]
            dist[i] += np.einsum("ij,ij->i", diff, diff)
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[: n - f - 2].sum()
    return scores


def krum_ranking(batch: UpdateBatch, num_byzantine: int) -> list[int]:
    """Indices into ``batch.updates`` from best (lowest score) to worst; ties go to the lower node_id."""
    # A stable sort over node_id-sorted updates breaks ties by node_id, whatever the arrival order.
    return [int(i) for i in np.argsort(krum_scores(batch, num_byzantine), kind="stable")]


@register_aggregator("krum")
@dataclass(frozen=True, kw_only=True)
class Krum(Aggregator):
    """Return the single update with the lowest Krum score, unchanged.

    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
    NeurIPS 2017, https://papers.nips.cc/paper/6617. Tolerates ``f`` Byzantine clients out of
    ``n > 2f + 2``; with fewer updates it raises (see :attr:`min_clients`), including a lone
    client when ``f = 0``: Krum needs at least 3 updates to compare.

    Attributes
    ----------
    num_byzantine:
        ``f``, the number of Byzantine clients tolerated (config ``aggregator.options.num-byzantine``).
    """

    num_byzantine: int = 0

    permutation_invariant: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_num_byzantine(self.num_byzantine)

    @property
    def min_clients(self) -> int:
        """``2f + 3``, the smallest ``n`` with ``n > 2f + 2``."""
        return 2 * self.num_byzantine + 3

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        """Return a copy of the best-scored update's arrays."""
        batch = UpdateBatch(updates, aggregator=self.name, server_round=server_round)
        best = krum_ranking(batch, self.num_byzantine)[0]
        return batch.to_global(dict(batch.updates[best].arrays), kept=[best])
