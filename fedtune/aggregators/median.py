"""Coordinate-wise median, a Byzantine-robust aggregator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate
from fedtune.aggregators.batch import UpdateBatch
from fedtune.aggregators.registry import register_aggregator


@register_aggregator("median")
@dataclass(frozen=True, kw_only=True)
class Median(Aggregator):
    """Coordinate-wise median of the client updates (unweighted).

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
    ICML 2018, https://arxiv.org/abs/1803.01498. Unweighted on purpose: ``num_examples`` is
    self-reported, so weighting would hand a liar the robustness budget. With an even number of
    clients the two middle values are averaged.
    """

    permutation_invariant: ClassVar[bool] = True

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        """Return the per-coordinate median of every array."""
        batch = UpdateBatch(updates, aggregator=self.name, server_round=server_round)
        return batch.to_global({name: np.median(batch.stack(name), axis=0) for name in batch.names})
