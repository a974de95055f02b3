"""Per-round overhead of a real Flower deployment on loopback: Flower's share, fedtune's share, training.

Part 1 runs a SuperLink (TLS, SuperNode authentication) and two SuperNodes, each with its own data
file, through ``flwr run`` (:func:`fedtune.flower.loopback.run_loopback`). Every message starts a
fresh ``flwr-clientapp`` process; each node writes its phases to ``node-rounds.jsonl``:

* fedtune's share: fedtune's own imports (timed in a fresh process: ``import client.app`` after
  Flower's modules), data load, model load (torch and transformers imports included), state load
  (the node's verified weights), batch setup, replay, state save;
* training: the local ZO steps;
* Flower's share: the server's round time minus the slowest node's fedtune share plus training, so
  process start, Flower's imports, polling and message transfer.

``overhead_over_training`` is fedtune's share over training (median over nodes and steady rounds,
i.e. rounds after the first). Part 2 measures, in-process on the same model, a replay after one
missed round against a full replay from theta_0 (what every round cost before the node kept its
weights), with seed histories drawn as the demo config draws them (clients x steps per round).

``python benchmarks/deploy_overhead.py [--quick]``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedtune.config import RunConfig, Scalar  # noqa: E402

FEDTUNE_PHASES = ("data_load_s", "model_load_s", "state_load_s", "data_s", "replay_s", "state_save_s")


def deployment_config(quick: bool) -> dict[str, Scalar]:
    """The demo model and local steps (SmolLM2-135M, tau 6, batch 8); quick: a 1-layer slice."""
    return {
        "model.num-layers": 1 if quick else 0,
        "model.device": "cpu",
        "data.max-train-examples": 200,
        "data.heldout-size": 8,
        "data.eval-generations": 0,
        "federation.num-clients": 2,
        "federation.clients-per-round": 2,
        "federation.num-rounds": 1 if quick else 4,
        "federation.round-timeout-s": 600.0,
        "federation.node-wait-s": 120.0,
        "zo.local-steps": 2 if quick else 6,
        "zo.batch-size": 2 if quick else 8,
    }


def fedtune_import_s(reps: int) -> dict[str, float]:
    """``import client.app`` in a fresh interpreter that already imported Flower's modules."""
    code = (
        "import time, flwr.clientapp, flwr.app; t = time.perf_counter(); import client.app; "
        "print(time.perf_counter() - t)"
    )
    runs = []
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        )
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return summary(runs)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def per_round(report: dict[str, Any], import_s: float, first: int = 2) -> list[dict[str, Any]]:
    """One row per round from ``first`` on (round 1 starts with nothing on disk: a cold setup)."""
    server = {int(r["round"]): r for r in report["server_rounds"] if r.get("round_s") is not None}
    nodes = {int(k): {int(r["round"]): r for r in v} for k, v in report["node_rounds"].items()}
    rows = []
    for rnd in sorted(server):
        if rnd < first:
            continue
        shares = []
        for node, rounds in sorted(nodes.items()):
            r = rounds.get(rnd)
            if r is None or r.get("outcome") != "ok":
                continue
            fedtune = import_s + sum(float(r.get(k, 0.0)) for k in FEDTUNE_PHASES)
            shares.append(
                {
                    "node": node,
                    "fedtune_s": round(fedtune, 3),
                    "training_s": round(float(r["train_s"]), 3),
                    "replayed_seeds": int(r.get("replayed_seeds", -1)),
                    "state_restored": int(r.get("state_restored", 0)),
                    "phases": {k: round(float(r.get(k, 0.0)), 3) for k in FEDTUNE_PHASES},
                    "process_age_at_start_s": r.get("process_age_at_start_s"),
                }
            )
        if not shares:
            continue
        slowest = max(s["fedtune_s"] + s["training_s"] for s in shares)
        rows.append(
            {
                "round": rnd,
                "round_s": float(server[rnd]["round_s"]),
                "flower_s": round(float(server[rnd]["round_s"]) - slowest, 3),
                "nodes": shares,
            }
        )
    return rows


def replay_after_missed_round(cfg: RunConfig, rounds: dict[int, int]) -> dict[str, Any]:
    """Full replay of A_R from theta_0 vs a node that missed one round syncing from its saved state."""
    from fedtune.fedkseed.replica import build_replica

    fed, k = cfg.federation, cfg.fedkseed.num_seeds
    per_round_seeds = fed.clients_per_round * cfg.zo.local_steps
    rng = np.random.default_rng(np.random.SeedSequence([0xDE9107, cfg.run.seed]))
    replica = build_replica(cfg)
    client = replica.client
    warm = np.zeros(k)
    warm[rng.integers(0, k, size=4)] = 1e-6
    client.sync_to(warm)  # warm-up: first-touch allocations and thread pools, as in a steady round
    out: dict[str, Any] = {}
    for total, reps in rounds.items():
        history = [rng.integers(0, k, size=per_round_seeds) for _ in range(total)]
        acc = [np.zeros(k)]
        for seeds in history:
            step = acc[-1].copy()
            np.add.at(step, seeds, rng.normal(0, 1e-6, size=seeds.size))
            acc.append(step)
        # The node trained in round R-1 (its own steps moved C away from A_{R-1}), missed round R.
        held = acc[total - 2].copy()
        own = rng.integers(0, k, size=cfg.zo.local_steps)
        held[own] += rng.normal(0, 1e-6, size=own.size)
        full, delta = [], []
        for _ in range(reps):
            client.sync_to(np.zeros(k))
            t = time.perf_counter()
            n_full = client.sync_to(acc[total])
            full.append(time.perf_counter() - t)
            client.sync_to(np.zeros(k))
            client.sync_to(held)
            t = time.perf_counter()
            n_delta = client.sync_to(acc[total])
            delta.append(time.perf_counter() - t)
        out[f"R{total}"] = {
            "rounds_so_far": total,
            "full_replay": {"seeds": n_full, "s": summary(full)},
            "after_one_missed_round": {"seeds": n_delta, "s": summary(delta)},
            "reps": reps,
            "ratio": round(statistics.median(delta) / statistics.median(full), 4),
        }
    client.sync_to(np.zeros(k))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="1-layer model, 1 cold round (under a minute)")
    ap.add_argument("--work-dir", type=Path, help="keep the deployment's files here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedtune.flower.loopback import run_loopback

    start = time.perf_counter()
    flat = deployment_config(args.quick)
    cfg = RunConfig.from_flat(flat)
    imports = fedtune_import_s(reps=1 if args.quick else 3)
    print(f"fedtune import in a ClientApp process: {imports['median']:.3f} s", flush=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedtune-deploy-bench-"))
    # One thread per node: two nodes on one 2-core machine, each like a 1-core device (two torch
    # pools of 2 threads each would thrash and inflate the training time the ratio divides by).
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    report = run_loopback(work, flat, num_nodes=2, timeout_s=1800, env=threads).to_json()
    # --quick has a single, cold round (a deployment's polls make two rounds exceed a minute).
    rows = per_round(report, imports["median"], first=1 if args.quick else 2)
    ratios = [s["fedtune_s"] / s["training_s"] for row in rows for s in row["nodes"] if s["training_s"] > 0]
    print(f"loopback run: {report['status']} in {report['wall_s']:.0f} s", flush=True)
    # {rounds so far: repetitions}: R10 is the demo's 10 rounds, R40 the paper's 40 (one repetition:
    # its full replay alone is ~700 full-model regenerations).
    histories = {10: 1} if args.quick else {10: 3, 40: 1}
    replay = replay_after_missed_round(cfg, histories)
    result = {
        "benchmark": "deploy_overhead",
        "quick": args.quick,
        "setup": {
            "model": cfg.model.name,
            "num_layers": cfg.model.num_layers,
            "local_steps": cfg.zo.local_steps,
            "batch_size": cfg.zo.batch_size,
            "max_length": cfg.model.max_length,
            "num_seeds": cfg.fedkseed.num_seeds,
            "perturbation": cfg.zo.perturbation,
            "nodes": 2,
            "threads_per_node": 1,
            "rounds": cfg.federation.num_rounds,
            "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "status": report["status"],
        "fedtune_import_s": imports,
        "measured_rounds": "round 1 (cold)" if args.quick else "rounds 2+ (steady)",
        "rounds": rows,
        "overhead_over_training": round(statistics.median(ratios), 3) if ratios else None,
        "flower_s_median": round(statistics.median(r["flower_s"] for r in rows), 3) if rows else None,
        "replay": replay,
        "targets": {
            "overhead_over_training_max": 0.5,
            "replay_ratio_max": 0.1,
        },
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
