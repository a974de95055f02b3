"""Apply one seed's direction to all tuned tensors, pass after pass, within a memory budget.

A two-point step needs the same z three times. Caching it saves regenerations (Gaussian z is the dominant
CPU cost, ``fedkseed.md`` §9) but a float32 cache costs 4 bytes per parameter, more than MeZO's "memory equals
inference" promise allows on the full model. Rademacher signs cache as packed bits (d/8 bytes), so they are
always cheap to keep. Gaussian z that is not cached is regenerated and added in one compiled pass on CPU
(:mod:`.gaussian_jit`), or piece by piece for an accelerator, so a worker's scratch is one piece and the
budget goes to caches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, get_args

import torch

from fedtune.zo.kernels import CPU_CHUNK as PIECE
from fedtune.zo.kernels import SignWorkspace, balanced_groups, flat_view, run_groups
from fedtune.zo.params import TunedParameters
from fedtune.zo.perturbation import MAX_SEED_INDEX, Perturbation

CacheMode = Literal["auto", "always", "never"]
CACHE_MODES: tuple[str, ...] = get_args(CacheMode)


class SeedDirection:
    """``theta += alpha * z(seed)`` over every tuned tensor, regenerating or caching z per tensor.

    Parameters
    ----------
    tuned, perturbation
        The tensors and the generator for their directions (shapes must agree).
    cache
        ``"always"``: keep z for every tensor (float32 for Gaussian, packed bits for Rademacher).
        ``"never"``: regenerate z on every pass (one tensor's worth of scratch per thread).
        ``"auto"``: cache what fits in ``budget_bytes``, largest tensors first; the rest is regenerated.
    budget_bytes
        Extra memory the caches and scratch may use (``"auto"`` only).
    threads
        Worker threads; each owns tensors of similar total size and its own scratch.
    """

    def __init__(
        self,
        tuned: TunedParameters,
        perturbation: Perturbation,
        *,
        cache: CacheMode,
        budget_bytes: int,
        threads: int,
    ) -> None:
        if tuned.shapes != perturbation.shapes:
            raise ValueError("perturbation shapes do not match the tuned tensors; build both from one model")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        tuned.check_trainable()
        self.tuned = tuned
        self.perturbation = perturbation
        numels = perturbation.numels
        self.groups = balanced_groups(numels, threads)
        self.cached = self._plan_cache(numels, cache, budget_bytes)
        self._seed: int | None = None
        self._filled = False
        self._cache: dict[int, torch.Tensor] = {}
        self._scratch: list[torch.Tensor | None] = [None] * len(self.groups)
        self._signs: list[SignWorkspace | None] = [None] * len(self.groups)

    def _plan_cache(self, numels: Sequence[int], cache: CacheMode, budget: int) -> frozenset[int]:
        everything = frozenset(range(len(numels)))
        if cache == "always":
            return everything
        if cache == "never":
            return frozenset()
        if self._extra_bytes(numels, everything) <= budget:
            return everything
        # Partial cache: add tensors largest-first while caches plus regeneration scratch fit the budget.
        chosen: set[int] = set()
        for position in sorted(range(len(numels)), key=lambda p: (-numels[p], p)):
            if self._extra_bytes(numels, frozenset(chosen | {position})) <= budget:
                chosen.add(position)
        return frozenset(chosen)

    def _extra_bytes(self, numels: Sequence[int], cached: frozenset[int]) -> int:
        """Cache bytes plus per-thread regeneration scratch (Gaussian, CPU) for a cache plan."""
        if self.perturbation.kind == "rademacher":
            return sum((numels[p] + 7) // 8 for p in cached)
        # Regenerated tensors need one piece of scratch per worker, not a tensor's worth.
        scratch = sum(
            min(PIECE, max((numels[p] for p in group if p not in cached), default=0)) for group in self.groups
        )
        return 4 * (sum(numels[p] for p in cached) + scratch)

    @property
    def extra_bytes(self) -> int:
        """Memory this object adds on top of the model once warm (caches and scratch)."""
        return self._extra_bytes(self.perturbation.numels, self.cached)

    def reset(self, seed_index: int) -> None:
        """Point at a new seed; the next pass regenerates (and caches) its direction."""
        if not 0 <= seed_index < MAX_SEED_INDEX:
            raise ValueError(f"seed_index must be in [0, {MAX_SEED_INDEX}), got {seed_index}")
        self._seed = seed_index
        self._filled = False

    def add_(self, alpha: float) -> None:
        """One pass: ``theta += alpha * z`` for every tuned tensor."""
        if self._seed is None:
            raise RuntimeError("call reset(seed_index) before add_")
        seed = self._seed
        run_groups(self.groups, lambda g, positions: self._work(g, positions, seed, alpha))
        self._filled = True

    def _work(self, group: int, positions: Sequence[int], seed: int, alpha: float) -> None:
        for position in positions:
            target = flat_view(self.tuned.tensors[position])
            if self.perturbation.kind == "gaussian":
                if position in self.cached:
                    target.add_(self._cached_gaussian(group, position, seed, target.device), alpha=alpha)
                elif target.device.type == "cpu":  # one compiled pass: generate, gather, add
                    self.perturbation.add_gaussian_(seed, position, target, alpha)
                else:
                    self._add_gaussian_pieces(group, position, seed, target, alpha)
            else:
                workspace = self._signs[group]
                if workspace is None or workspace.lut.device != target.device:
                    workspace = self._signs[group] = SignWorkspace(target.device)
                workspace.axpy_(target, self._packed(position, seed, target.device), alpha)

    def _cached_gaussian(self, group: int, position: int, seed: int, device: torch.device) -> torch.Tensor:
        n = self.perturbation.numels[position]
        z = self._cache.get(position)
        if z is None:
            z = self._cache[position] = torch.empty(n, dtype=torch.float32, device=device)
        if not self._filled:
            if device.type == "cpu":
                self.perturbation.fill_gaussian(seed, position, z)
            else:
                for (start, stop), piece in self._pieces(group, position, seed):
                    z[start:stop].copy_(piece)
        return z

    def _add_gaussian_pieces(
        self, group: int, position: int, seed: int, target: torch.Tensor, alpha: float
    ) -> None:
        """Accelerator: generate z on the CPU piece by piece (the values are the CPU's), copy, add."""
        for (start, stop), piece in self._pieces(group, position, seed):
            target[start:stop].add_(piece.to(target.device), alpha=alpha)

    def _pieces(self, group: int, position: int, seed: int) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
        n = self.perturbation.numels[position]
        scratch = self._scratch[group]
        if scratch is None:
            scratch = self._scratch[group] = torch.empty(PIECE, dtype=torch.float32)
        for start in range(0, n, PIECE):
            stop = min(n, start + PIECE)
            yield (
                (start, stop),
                self.perturbation.fill_gaussian(seed, position, scratch, start=start, count=stop - start),
            )

    def _packed(self, position: int, seed: int, device: torch.device) -> torch.Tensor:
        if position not in self.cached:
            return self.perturbation.packed_signs(seed, position).to(device)
        if not self._filled or position not in self._cache:
            self._cache[position] = self.perturbation.packed_signs(seed, position).to(device)
        return self._cache[position]
