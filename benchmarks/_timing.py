"""Repeated timing shared by the engine benchmarks: median, min and max of interleaved repetitions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def summarize(values: list[float]) -> dict[str, float]:
    """``{"median", "min", "max", "reps"}`` of a list of seconds (rounded for the JSON line)."""
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "reps": len(values),
    }


def interleaved(
    jobs: Mapping[str, Callable[[], object]], reps: int, *, warmup: bool = True
) -> dict[str, dict[str, float]]:
    """Time every job ``reps`` times, alternating jobs within each repetition.

    Alternation spreads load from other processes on a shared machine over all jobs alike. With ``warmup``
    each job runs once untimed first (allocator, caches, lazy buffers), for baselines as for fedtune.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if warmup:
        for fn in jobs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(reps):
        for name, fn in jobs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in times.items()}
