"""Seed replay: theta += sum_s c_s z_s for many seeds, as a FedKSeed party rebuilds the global model.

FedKSeed's sync is ``theta_r = theta_0 - lr * sum_s A_s z_s`` over up to K seeds (``fedkseed.md`` §1.3); its
cost, K full-model regenerations, dominates a round (§7.4). Looping tensors outer and seeds inner lets each
tensor accumulate every seed's contribution into one buffer (in cache-sized chunks for packed signs) and touch
the weight once, with workers in parallel over tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from fedtune.zo.kernels import SignWorkspace, balanced_groups, flat_view, run_groups
from fedtune.zo.params import TunedParameters
from fedtune.zo.perturbation import MAX_SEED_INDEX, Perturbation

SeedIndices = Sequence[int] | npt.NDArray[np.integer]
Values = Sequence[float] | npt.NDArray[np.floating]
Coefficients = npt.NDArray[np.floating] | tuple[SeedIndices, Values]
"""Either a dense array indexed by seed index, or parallel (seed_indices, values) arrays."""


def nonzero_coefficients(coefficients: Coefficients) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Validated (seed_indices, values) without zeros, in increasing seed order (a fixed replay order)."""
    if isinstance(coefficients, tuple):
        if len(coefficients) != 2:
            raise ValueError("pass coefficients as a dense array or as (seed_indices, values)")
        indices = np.asarray(coefficients[0])
        values = np.asarray(coefficients[1], dtype=np.float64)
        if indices.ndim != 1 or indices.shape != values.shape:
            raise ValueError(f"seed_indices {indices.shape} and values {values.shape} must be equal 1-D")
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"seed_indices must be integers, got {indices.dtype}")
        indices = indices.astype(np.int64)
        if np.unique(indices).size != indices.size:
            raise ValueError("seed_indices contain duplicates; sum their values first")
    else:
        values = np.asarray(coefficients, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"dense coefficients must be 1-D (one per seed index), got shape {values.shape}")
        indices = np.arange(values.size, dtype=np.int64)
    if not np.all(np.isfinite(values)):
        raise ValueError("coefficients must be finite; drop or clip NaN/Inf projected gradients first")
    if indices.size and (indices.min() < 0 or indices.max() >= MAX_SEED_INDEX):
        raise ValueError(f"seed indices must be in [0, {MAX_SEED_INDEX})")
    keep = values != 0.0
    order = np.argsort(indices[keep], kind="stable")
    return indices[keep][order], values[keep][order]


def replay(
    tuned: TunedParameters,
    perturbation: Perturbation,
    coefficients: Coefficients,
    *,
    threads: int = 2,
) -> int:
    """Add ``sum_s c_s z_s`` to the tuned tensors in place; return how many (non-zero) seeds were applied.

    Equal to applying the seeds one by one up to float32 rounding; ``replay(-c)`` undoes ``replay(c)``.
    Extra memory: one float32 accumulator of the largest tensor per thread (plus a Gaussian z buffer).
    """
    if tuned.shapes != perturbation.shapes:
        raise ValueError("perturbation shapes do not match the tuned tensors; build both from one model")
    tuned.check_trainable()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    seeds, values = nonzero_coefficients(coefficients)
    if seeds.size == 0:
        return 0
    pairs = list(zip(seeds.tolist(), values.tolist(), strict=True))
    groups = balanced_groups(perturbation.numels, threads)

    def work(_: int, positions: Sequence[int]) -> None:
        size = max(perturbation.numels[p] for p in positions)
        accumulator: torch.Tensor | None = None
        z_cpu = torch.empty(size, dtype=torch.float32) if perturbation.kind == "gaussian" else None
        signs: SignWorkspace | None = None
        for position in positions:
            target = flat_view(tuned.tensors[position])
            n = target.numel()
            if accumulator is None or accumulator.device != target.device:
                accumulator = torch.empty(size, dtype=torch.float32, device=target.device)
            acc = accumulator[:n].zero_()
            for seed, value in pairs:
                if z_cpu is not None:
                    z = perturbation.fill_gaussian(seed, position, z_cpu)
                    acc.add_(z if target.device.type == "cpu" else z.to(target.device), alpha=value)
                else:
                    if signs is None or signs.lut.device != target.device:
                        signs = SignWorkspace(target.device)
                    signs.axpy_(acc, perturbation.packed_signs(seed, position).to(target.device), value)
            target.add_(acc)

    run_groups(groups, work)
    return len(pairs)
