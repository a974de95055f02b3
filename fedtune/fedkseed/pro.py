"""FedKSeed-Pro seed importance (Qin et al., "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", ICML 2024, Sec. 4.3).

Each seed's importance is the mean absolute (clipped) scalar gradient reported for it so far,
starting from ``grad_initial``; scores are min-max normalised and turned into sampling
probabilities with a softmax, so p_max / p_min <= e.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import StateValue


class SeedImportance:
    """Server-side running statistics behind FedKSeed-Pro's seed probabilities."""

    def __init__(self, num_seeds: int, *, clip: float = 1000.0, grad_initial: float = 0.0) -> None:
        if num_seeds < 1:
            raise ValueError("num_seeds must be >= 1")
        if clip <= 0:
            raise ValueError("clip must be > 0 (the paper uses 1000)")
        self.num_seeds = num_seeds
        self.clip = float(clip)
        # The reference history starts every seed with [grad_initial].
        self.sum_abs = np.full(num_seeds, abs(np.clip(grad_initial, -clip, clip)), dtype=np.float64)
        self.count = np.ones(num_seeds, dtype=np.int64)

    def update(self, seed_indices: npt.NDArray[np.integer], grads: npt.NDArray[np.floating]) -> None:
        """Add raw (unweighted) per-step scalars, as the reference keeps every reported value."""
        idx = np.asarray(seed_indices, dtype=np.int64)
        g = np.abs(np.clip(np.asarray(grads, dtype=np.float64), -self.clip, self.clip))
        if idx.shape != g.shape:
            raise ValueError(f"seed_indices {idx.shape} and grads {g.shape} must have the same length")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_seeds):
            raise ValueError(f"seed indices must lie in [0, {self.num_seeds})")
        np.add.at(self.sum_abs, idx, g)
        np.add.at(self.count, idx, 1)

    def scores(self) -> npt.NDArray[np.float64]:
        """Normalised importance in [0, 1]: (a - min a) / (max a - min a + 1e-10)."""
        a = self.sum_abs / self.count
        out: npt.NDArray[np.float64] = (a - a.min()) / (a.max() - a.min() + 1e-10)
        return out

    def probabilities(self) -> npt.NDArray[np.float64]:
        """softmax(scores): the sampling distribution over seed indices."""
        s = self.scores()
        e = np.exp(s - s.max())
        out: npt.NDArray[np.float64] = e / e.sum()
        return out

    def state_dict(self) -> dict[str, StateValue]:
        return {"sum_abs": self.sum_abs.copy(), "count": self.count.copy(), "clip": self.clip}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        sum_abs = np.asarray(state["sum_abs"], dtype=np.float64)
        count = np.asarray(state["count"], dtype=np.int64)
        if sum_abs.shape != (self.num_seeds,) or count.shape != (self.num_seeds,):
            raise ValueError(f"Pro state is for {sum_abs.shape} seeds; this run has {self.num_seeds}")
        if (count < 1).any():
            raise ValueError("Pro state has non-positive counts; the checkpoint is corrupt")
        self.sum_abs, self.count, self.clip = sum_abs.copy(), count.copy(), float(state["clip"])  # type: ignore[arg-type]
