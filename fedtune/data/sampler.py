"""Deterministic minibatch index sampling, keyed per (run, round, client).

Zeroth-order tuning of a classifier-as-instruction task collapses onto one label when batches
are unbalanced (see docs/offline-assets.md), hence the optional class-balanced mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["BatchSampler"]


class BatchSampler:
    """Endless sampler of ``batch_size`` row indices from ``range(num_examples)``.

    Without labels it walks seeded permutations (each epoch without replacement, reshuffled when
    exhausted). With labels it takes one row per class in turn (round-robin, classes in sorted
    order), each class drawn without replacement from its own shuffled queue, reshuffled when
    that class is exhausted. All randomness comes from ``np.random.SeedSequence(key)``, so
    ``key=(run_seed, round, node_id)`` gives a collision-free, reproducible stream.
    """

    def __init__(
        self,
        *,
        num_examples: int,
        batch_size: int,
        key: Sequence[int],
        labels: Sequence[str] | None = None,
    ) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1; got {num_examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if len(key) == 0 or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in key):
            raise ValueError(f"key must be a non-empty sequence of non-negative ints; got {key!r}")
        if labels is not None and (isinstance(labels, str) or len(labels) != num_examples):
            raise ValueError(f"labels must hold one label per example ({num_examples}); got {len(labels)}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self._rng = np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))
        if labels is None:
            self._pools = [np.arange(num_examples)]
        else:
            by_class: dict[str, list[int]] = {}
            for i, label in enumerate(labels):
                by_class.setdefault(str(label), []).append(i)
            self._pools = [np.asarray(by_class[c]) for c in sorted(by_class)]
        self._queues: list[list[int]] = [[] for _ in self._pools]
        self._next_class = 0

    @property
    def num_classes(self) -> int:
        return len(self._pools)

    def _draw(self, c: int, taken: set[int]) -> int:
        if not self._queues[c]:
            order: list[int] = self._rng.permutation(self._pools[c]).tolist()
            # A reshuffle mid-batch defers rows already in this batch, so a batch repeats a row only
            # when it is larger than the pool. The queue is popped from its end.
            fresh = [i for i in order if i not in taken]
            self._queues[c] = (fresh + [i for i in order if i in taken])[::-1]
        return self._queues[c].pop()

    def next_indices(self) -> list[int]:
        """The next batch. A batch larger than a pool wraps into that pool's next shuffle."""
        out: list[int] = []
        for _ in range(self.batch_size):
            out.append(self._draw(self._next_class, set(out)))
            self._next_class = (self._next_class + 1) % len(self._pools)
        return out
