"""Centralized zeroth-order fine-tuning: the MeZO loop without federation, for baselines and tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from torch import nn

from fedtune.data.batch import TokenBatch
from fedtune.zo.params import ParamSelection, select_parameters
from fedtune.zo.perturbation import ENGINE_TAG, MAX_SEED_INDEX
from fedtune.zo.step import MeZOStep, StepResult, ZOConfig

_SEED_DRAW_TAG = 2

BatchSource = Callable[[int], TokenBatch] | Iterable[TokenBatch]
"""``batches(step)`` or an iterable yielding one batch per step."""


def seed_index_stream(run_seed: int) -> np.random.Generator:
    """The explicit generator that draws per-step seed indices for a run (never the global RNG)."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([ENGINE_TAG, run_seed, _SEED_DRAW_TAG]))
    )


def _batch_getter(batches: BatchSource) -> Callable[[int], TokenBatch]:
    if callable(batches):
        return batches
    iterator = iter(batches)

    def take(step: int) -> TokenBatch:
        try:
            return next(iterator)
        except StopIteration:
            raise ValueError(f"batches ran out after {step} steps; pass at least `steps` batches") from None

    return take


def train_zo(
    model: nn.Module,
    *,
    selection: ParamSelection,
    config: ZOConfig,
    batches: BatchSource,
    steps: int,
    lr: float,
    run_seed: int,
    seed_pool_size: int | None = None,
    eval_fn: Callable[[int, StepResult], None] | None = None,
) -> list[StepResult]:
    """Run ``steps`` MeZO steps in place and return their results.

    Parameters
    ----------
    seed_pool_size
        Draw seed indices uniformly from ``range(seed_pool_size)`` (FedKSeed's K); ``None`` draws from the
        whole index space, as MeZO draws a fresh seed per step.
    eval_fn
        Called as ``eval_fn(step, result)`` after every step (``step`` counts from 1).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if seed_pool_size is not None and not 1 <= seed_pool_size <= MAX_SEED_INDEX:
        raise ValueError(f"seed_pool_size must be in [1, {MAX_SEED_INDEX}] or None, got {seed_pool_size}")
    tuned = select_parameters(model, selection)
    stepper = MeZOStep(model, tuned, config, run_seed=run_seed)
    draws = seed_index_stream(run_seed)
    high = seed_pool_size if seed_pool_size is not None else MAX_SEED_INDEX
    take = _batch_getter(batches)
    results: list[StepResult] = []
    for step in range(steps):
        result = stepper.step(take(step), int(draws.integers(0, high)), lr)
        results.append(result)
        if eval_fn is not None:
            eval_fn(step + 1, result)
    return results
