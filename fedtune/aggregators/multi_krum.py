"""Multi-Krum: average the updates with the best Krum scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate
from fedtune.aggregators.batch import UpdateBatch
from fedtune.aggregators.krum import check_num_byzantine, krum_ranking
from fedtune.aggregators.registry import register_aggregator
from fedtune.aggregators.weighted_mean import weighted_sum


@register_aggregator("multi-krum")
@dataclass(frozen=True, kw_only=True)
class MultiKrum(Aggregator):
    """Unweighted mean of the ``m`` updates with the lowest Krum scores.

    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
    NeurIPS 2017, https://papers.nips.cc/paper/6617 (Multi-Krum). Unweighted as in the paper:
    ``num_examples`` is self-reported, so a selected liar could otherwise dominate. Requires
    ``n > 2f + 2`` and ``m <= n - f`` (larger ``m`` would always include a Byzantine update).

    Attributes
    ----------
    num_byzantine:
        ``f`` (config ``aggregator.options.num-byzantine``).
    krum_select:
        ``m`` (config ``aggregator.options.krum-select``); 0 means ``n - f``.
    """

    num_byzantine: int = 0
    krum_select: int = 0

    permutation_invariant: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_num_byzantine(self.num_byzantine)
        m = self.krum_select
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(
                f"krum_select (aggregator.options.krum-select) must be an integer >= 0 "
                f"(0 means n - f), got {m!r}"
            )

    @property
    def min_clients(self) -> int:
        """``max(2f + 3, m + f)``: Krum's bound, and enough updates to select ``m`` of ``n - f``."""
        return max(2 * self.num_byzantine + 3, self.krum_select + self.num_byzantine)

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        """Return the mean of the ``m`` best-scored updates."""
        batch = UpdateBatch(updates, aggregator=self.name, server_round=server_round)
        n, f = len(batch), self.num_byzantine
        ranking = krum_ranking(batch, f)
        m = self.krum_select or n - f
        if m > n - f:
            raise ValueError(
                f"multi-krum: krum_select={m} exceeds n - f = {n} - {f}, so a Byzantine update would "
                f"always be selected; lower aggregator.options.krum-select or sample at least {m + f} clients"
            )
        chosen = np.zeros(n, dtype=np.float64)
        chosen[ranking[:m]] = 1.0
        return batch.to_global(weighted_sum(batch, chosen, divisor=float(m)), kept=ranking[:m])
