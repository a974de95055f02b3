"""Seed replay (FedKSeed's model sync) against the naive seed-by-seed loop on the same threads.

Usage: ``python benchmarks/replay.py [--quick]`` (``--quick``: the 2-layer SmolLM2 slice, K = 256 and 512).
For each K, ``K * nonzero_fraction`` seeds get random non-zero coefficients (a round of FedKSeed touches a
subset of the pool). ``replay`` times :func:`fedtune.zo.replay`; ``naive`` is the loop a careful user writes:
per seed, per tensor, regenerate the direction and add it into the weight, with the tensors split over the
same number of worker threads and the same untimed warm-up. Each figure is the median of ``--reps``
repetitions (min and max alongside). ``rel_err`` is ``|replay - naive| / |naive|`` over the tuned weights, and
``replay_s_per_seed / axpy_pass_s`` compares the cost per non-zero seed with one plain ``add_`` pass over the
model. The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from _timing import interleaved

from fedtune.assets.models import load_causal_lm
from fedtune.zo import ParamSelection, Perturbation, TunedParameters, replay, select_parameters


def split_tensors(numels: Sequence[int], threads: int) -> list[list[int]]:
    """Tensor positions dealt to ``threads`` workers, largest first onto the lightest worker."""
    loads = [0] * threads
    parts: list[list[int]] = [[] for _ in range(threads)]
    for position in sorted(range(len(numels)), key=lambda p: -numels[p]):
        worker = loads.index(min(loads))
        parts[worker].append(position)
        loads[worker] += numels[position]
    return [part for part in parts if part]


def naive_replay(
    tuned: TunedParameters,
    perturbation: Perturbation,
    dense: np.ndarray,
    pool: ThreadPoolExecutor,
    threads: int,
) -> None:
    """Seed by seed, tensor by tensor: regenerate z and ``add_`` it, the tensors split over the pool."""
    seeds = [(int(s), float(dense[s])) for s in np.flatnonzero(dense)]

    def work(positions: list[int]) -> None:
        with torch.inference_mode():
            for seed, value in seeds:
                for position in positions:
                    tuned.tensors[position].add_(perturbation.materialize(seed, position), alpha=value)

    parts = split_tensors(perturbation.numels, threads)
    for future in [pool.submit(work, part) for part in parts]:
        future.result()


def distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum(float(((x - y).double() ** 2).sum()) for x, y in zip(a, b, strict=True)) ** 0.5)


def coefficients(k: int, nonzero: int) -> np.ndarray:
    draws = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, k])))
    dense = np.zeros(k)
    dense[draws.choice(k, nonzero, replace=False)] = draws.normal(0.0, 1e-6, nonzero)
    return dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-layer slice and smaller K")
    parser.add_argument("--kinds", default="rademacher,gaussian")
    parser.add_argument("--nonzero-fraction", type=float, default=1 / 32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    model = load_causal_lm("smollm2-135m", num_layers=2 if args.quick else None)
    tuned = select_parameters(model, ParamSelection())
    start_weights = [t.detach().clone() for t in tuned.tensors]
    pool = ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="naive")

    def reset() -> None:
        with torch.inference_mode():
            for t, w in zip(tuned.tensors, start_weights, strict=True):
                t.copy_(w)

    zeros = [torch.zeros_like(w) for w in start_weights]

    def axpy_pass() -> None:
        with torch.inference_mode():
            for t, z in zip(tuned.tensors, zeros, strict=True):
                t.add_(z, alpha=1e-3)

    results: dict[str, dict[str, object]] = {}
    for kind in args.kinds.split(","):
        perturbation = Perturbation(kind=kind, run_seed=0, shapes=tuned.shapes)  # type: ignore[arg-type]
        warm = coefficients(8, 1)
        replay(tuned, perturbation, warm, threads=args.threads)
        naive_replay(tuned, perturbation, warm, pool, args.threads)
        reset()
        for k in (256, 512) if args.quick else (1024, 4096):
            dense = coefficients(k, max(1, int(k * args.nonzero_fraction)))

            def run_replay(dense: np.ndarray = dense, pert: Perturbation = perturbation) -> None:
                reset()
                replay(tuned, pert, dense, threads=args.threads)

            def run_naive(dense: np.ndarray = dense, pert: Perturbation = perturbation) -> None:
                reset()
                naive_replay(tuned, pert, dense, pool, args.threads)

            # Both jobs pay the same reset (one copy of the weights); the comparison is untimed.
            jobs = {"replay": run_replay, "naive": run_naive, "axpy_pass": axpy_pass}
            times = interleaved(jobs, args.reps, warmup=False)
            axpy = times["axpy_pass"]
            theirs = [t.detach().clone() for t in tuned.tensors]  # the last naive run (axpy adds zeros)
            run_replay()
            ours = [t.detach() for t in tuned.tensors]
            rel_err = distance(ours, theirs) / distance(theirs, zeros)
            reset()
            applied = int(np.count_nonzero(dense))
            speedup = times["naive"]["median"] / times["replay"]["median"]
            per_seed = times["replay"]["median"] / applied
            results[f"{kind}_K{k}"] = {
                "kind": kind,
                "K": k,
                "nonzero_seeds": applied,
                "replay_s": times["replay"],
                "naive_replay_s": times["naive"],
                "speedup": round(speedup, 2),
                "replay_s_per_seed": round(per_seed, 5),
                "axpy_pass_s": axpy,
                "replay_s_per_seed_over_axpy_pass": round(per_seed / axpy["median"], 3),
                "rel_err": float(f"{rel_err:.2e}"),
                "targets_met": {"speedup>=3": speedup >= 3, "rel_err<=1e-6": rel_err <= 1e-6},
            }
    print(
        json.dumps(
            {
                "benchmark": "replay",
                "model": "smollm2-135m" + (" (2-layer slice)" if args.quick else ""),
                "num_params": sum(t.numel() for t in tuned.tensors),
                "threads": args.threads,
                "torch_threads": torch.get_num_threads(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
