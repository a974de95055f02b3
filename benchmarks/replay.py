"""Seed replay (FedKSeed's model sync) against a naive seed-by-seed, tensor-by-tensor loop.

Usage: ``python benchmarks/replay.py [--quick]`` (``--quick``: the 2-layer SmolLM2 slice, K = 256 and 512).
For each K, ``K * nonzero_fraction`` seeds get random non-zero coefficients (a round of FedKSeed touches a
subset of the pool). ``replay_s`` times :func:`fedtune.zo.replay`; ``naive_replay_s`` regenerates each seed's
direction into fresh tensors and adds them one at a time, undoing the replay, so ``restore_rel_err`` checks
that both compute the same update. The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from fedtune.assets.models import load_causal_lm
from fedtune.zo import ParamSelection, Perturbation, TunedParameters, replay, select_parameters


def naive_replay(tuned: TunedParameters, perturbation: Perturbation, dense: np.ndarray) -> None:
    """The straightforward loop: per seed, per tensor, a freshly allocated z added into the weight."""
    with torch.inference_mode():
        for seed in np.flatnonzero(dense):
            for position, tensor in enumerate(tuned.tensors):
                tensor.add_(perturbation.materialize(int(seed), position), alpha=float(dense[seed]))


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    total = sum(float(((x - y).double() ** 2).sum()) for x, y in zip(a, b, strict=True))
    return float(total**0.5)


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
    args = parser.parse_args()

    model = load_causal_lm("smollm2-135m", num_layers=2 if args.quick else None)
    tuned = select_parameters(model, ParamSelection())
    weights = [t.detach().clone() for t in tuned.tensors]
    norm = distance(weights, [torch.zeros_like(w) for w in weights])
    results: dict[str, dict[str, object]] = {}
    for kind in args.kinds.split(","):
        perturbation = Perturbation(kind=kind, run_seed=0, shapes=tuned.shapes)  # type: ignore[arg-type]
        replay(tuned, perturbation, coefficients(8, 1), threads=args.threads)  # warm-up (buffers, LUT)
        for t, w in zip(tuned.tensors, weights, strict=True):
            t.data.copy_(w)
        for k in (256, 512) if args.quick else (1024, 4096):
            dense = coefficients(k, max(1, int(k * args.nonzero_fraction)))
            start = time.perf_counter()
            applied = replay(tuned, perturbation, dense, threads=args.threads)
            replay_s = time.perf_counter() - start
            start = time.perf_counter()
            naive_replay(tuned, perturbation, -dense)
            naive_s = time.perf_counter() - start
            diff = distance([t.detach() for t in tuned.tensors], weights)
            for t, w in zip(tuned.tensors, weights, strict=True):
                t.data.copy_(w)
            results[f"{kind}_K{k}"] = {
                "kind": kind,
                "K": k,
                "nonzero_seeds": applied,
                "replay_s": round(replay_s, 3),
                "naive_replay_s": round(naive_s, 3),
                "speedup": round(naive_s / replay_s, 2),
                "replay_s_per_seed": round(replay_s / applied, 4),
                "restore_rel_err": float(f"{diff / norm:.2e}"),
                "target_speedup>=3_met": naive_s / replay_s >= 3,
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
