"""Seed replay: theta += sum_s c_s z_s for many seeds, as a FedKSeed party rebuilds the global model.

FedKSeed's sync is ``theta_r = theta_0 - lr * sum_s A_s z_s`` over up to K seeds (``fedkseed.md`` §1.3); its
cost, K full-model regenerations, dominates a round (§7.4). Workers split the tensors; each tensor gathers
every seed's contribution before the weight is touched once:

* Rademacher: 16 seeds per pass through a 65,536-entry table of their signed sums (:mod:`.sign_sums`; on
  CPU the compiled kernel of :mod:`.sign_jit` does the pass);
* Gaussian: seeds inner, cache-sized pieces outer, so each piece of z is added into an L2-resident
  accumulator right after it is generated (:mod:`.gaussian_jit`, one compiled call per tensor on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from fedtune.zo.kernels import CPU_CHUNK, CUDA_CHUNK, balanced_groups, flat_view, run_groups
from fedtune.zo.params import TunedParameters
from fedtune.zo.perturbation import MAX_SEED_INDEX, Perturbation
from fedtune.zo.sign_jit import add_sign_group_
from fedtune.zo.sign_sums import GROUP, SignSumWorkspace, group_table

SeedIndices = Sequence[int] | npt.NDArray[np.integer]
Values = Sequence[float] | npt.NDArray[np.floating]
Coefficients = npt.NDArray[np.floating] | tuple[SeedIndices, Values]
"""Either a dense array indexed by seed index, or parallel (seed_indices, values) arrays."""
Pair = tuple[int, float]


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
    Extra memory: Rademacher, one float32 accumulator of the largest tensor and two bytes per value of
    16 seeds' signs per thread; Gaussian, one piece of scratch per thread.
    """
    if tuned.shapes != perturbation.shapes:
        raise ValueError("perturbation shapes do not match the tuned tensors; build both from one model")
    tuned.check_trainable()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    seeds, values = nonzero_coefficients(coefficients)
    if seeds.size == 0:
        return 0
    groups = balanced_groups(perturbation.numels, threads)
    if perturbation.kind == "gaussian":
        run_groups(groups, lambda _, positions: _gaussian_work(tuned, perturbation, seeds, values, positions))
    else:
        pairs = list(zip(seeds.tolist(), values.tolist(), strict=True))
        seed_groups = [pairs[i : i + GROUP] for i in range(0, len(pairs), GROUP)]
        tables = [group_table([value for _, value in group]) for group in seed_groups]
        run_groups(groups, lambda _, at: _sign_work(tuned, perturbation, seed_groups, tables, at))
    return int(seeds.size)


def _sign_work(
    tuned: TunedParameters,
    perturbation: Perturbation,
    seed_groups: Sequence[Sequence[Pair]],
    tables: Sequence[torch.Tensor],
    positions: Sequence[int],
) -> None:
    """Per tensor: 16 seeds per table pass into one accumulator, then one add into the weight."""
    # On CPU the compiled kernel needs no scratch, so no SignSumWorkspace is built there.
    workspaces: dict[torch.device, tuple[SignSumWorkspace | None, torch.Tensor, list[torch.Tensor]]] = {}
    largest = max(perturbation.numels[p] for p in positions)
    for position in positions:
        target = flat_view(tuned.tensors[position])
        device = target.device
        if device not in workspaces:  # one accumulator per worker, reused: fresh pages cost more than work
            workspaces[device] = (
                None if device.type == "cpu" else SignSumWorkspace(device, CUDA_CHUNK),
                torch.empty(largest, dtype=torch.float32, device=device),
                [table.to(device) for table in tables],
            )
        workspace, accumulator, device_tables = workspaces[device]
        acc = accumulator[: target.numel()].zero_()
        for group, table in zip(seed_groups, device_tables, strict=True):
            if workspace is None:  # CPU: the compiled kernel, one pass, bit-identical to the torch path
                words = [perturbation.sign_words(seed, position) for seed, _ in group]
                add_sign_group_(acc.numpy(), words, table.numpy())
            else:
                packed = [perturbation.packed_signs(seed, position).to(device) for seed, _ in group]
                workspace.add_group_(acc, packed, table)
        target.add_(acc)


def _gaussian_work(
    tuned: TunedParameters,
    perturbation: Perturbation,
    seeds: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
    positions: Sequence[int],
) -> None:
    """Per tensor: every seed's piece summed in L2, then one add into the weight (CPU: one compiled call)."""
    acc = torch.empty(CPU_CHUNK, dtype=torch.float32)
    for position in positions:
        target = flat_view(tuned.tensors[position])
        if target.device.type == "cpu":
            perturbation.add_gaussian_sum_(position, seeds, values, target)
            continue
        for start in range(0, target.numel(), CPU_CHUNK):
            piece = acc[: min(CPU_CHUNK, target.numel() - start)].zero_()
            perturbation.add_gaussian_sum_(position, seeds, values, piece, start=start)
            target[start : start + piece.numel()].add_(piece.to(target.device))
