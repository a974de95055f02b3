"""Byzantine robustness of FedKSeed: final held-out loss per aggregator and attack.

f of the n clients (the first f nodes of the grid; every client takes part in every round) rewrite
their reply's per-step projected gradients before it leaves the node:

- ``none``: honest;  ``sign-flip``: g -> -g;  ``scale100``: g -> 100 g;
- ``noise``: g -> N(0, (100 std(g))^2), drawn from an explicit generator keyed on
  (run seed, attack tag, node, round).

Krum / multi-Krum get ``num-byzantine = f``; the trimmed mean trims f clients at each end
(``trim-fraction = f / n``). Runs the real ServerApp/ClientApp code on the in-process grid.

Usage: python benchmarks/robustness.py [--quick] [--threads 1]   (last line: one JSON object)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from _common import Stopwatch, Tamper, make_config, number, run_federated, setup_environment
from flwr.app import Message

ATTACKS = ("none", "sign-flip", "scale100", "noise")
QUICK_AGGREGATORS = ("weighted-mean", "median", "krum")
QUICK_ATTACKS = ("none", "sign-flip", "scale100")
_NOISE_TAG = 0x4E4F4953  # "NOIS": keeps the attack's generator apart from every other stream


def attacked(grads: np.ndarray[Any, np.dtype[np.float32]], attack: str, rng: np.random.Generator) -> Any:
    """The Byzantine version of one reply's projected gradients (float32, same length)."""
    if attack == "sign-flip":
        return (-grads).astype(np.float32)
    if attack == "scale100":
        return (100.0 * grads).astype(np.float32)
    if attack == "noise":
        std = float(np.std(grads)) if grads.size else 0.0
        return rng.normal(0.0, 100.0 * max(std, 1e-12), size=grads.shape).astype(np.float32)
    raise ValueError(f"unknown attack {attack!r}; pick one of {', '.join(ATTACKS)}")


def make_tamper(attack: str, byzantine: set[int], *, num_seeds: int, run_seed: int) -> Tamper | None:
    """A LocalGrid hook that rewrites the train replies of the ``byzantine`` node ids."""
    if attack == "none":
        return None
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; pick one of {', '.join(ATTACKS)}")
    from fedtune.flower.records import reply_content, reply_from
    from fedtune.wire.codec import decode_reply, encode_reply

    def tamper(node: int, msg: Message) -> Message | None:
        if node not in byzantine or msg.metadata.message_type != "train":
            return msg
        payload = reply_from(msg, node, 0).payload
        if payload is None:  # an error reply stays one
            return msg
        reply = decode_reply(payload, num_seeds=num_seeds)
        key = np.random.SeedSequence([run_seed, _NOISE_TAG, node, reply.server_round])
        grads = attacked(reply.projected_grads, attack, np.random.Generator(np.random.PCG64(key)))
        msg.content = reply_content(encode_reply(dataclasses.replace(reply, projected_grads=grads)))
        return msg

    return tamper


def aggregator_options(name: str, *, f: int, n: int) -> dict[str, int | float]:
    """Config overrides that tell each robust rule how many Byzantine clients to expect."""
    if name in ("krum", "multi-krum"):
        return {"aggregator.options.num-byzantine": f}
    if name == "trimmed-mean":
        return {"aggregator.options.trim-fraction": f / n}
    return {}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny run: 3 aggregators x 3 attacks, 2 rounds")
    p.add_argument("--clients", type=int, default=None, help="n (all take part every round)")
    p.add_argument("--byzantine", type=int, default=1, help="f, Byzantine clients")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=None, help="SmolLM2 layers kept (0 = all)")
    p.add_argument("--local-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--num-seeds", type=int, default=None, help="K, the FedKSeed seed pool")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--output-dir", default="runs/robustness", help="where the run folders go")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_environment(threads=args.threads)
    from fedtune.aggregators import available_aggregators

    q = args.quick
    n = args.clients or (5 if q else 7)
    f = args.byzantine
    if not 0 <= f < n / 2:
        raise ValueError(f"--byzantine {f} must be in [0, n/2) for n={n} clients")
    # Coordinate-wise rules (median, trimmed mean) only see a seed's coefficient where most clients
    # touched it: with K >> n * tau almost every coordinate is 0 for most clients and they stall.
    num_seeds = args.num_seeds or (4 if q else 16)
    flat: dict[str, Any] = {
        "run.name": "robustness",
        "run.output-dir": args.output_dir,
        "model.num-layers": args.num_layers if args.num_layers is not None else (2 if q else 4),
        "model.max-length": 48 if q else 64,
        "data.partition": "iid",
        "data.max-train-examples": 100 if q else 400,
        "data.heldout-size": 8 if q else 32,
        "data.eval-generations": 0,
        "federation.num-clients": n,
        "federation.clients-per-round": n,
        "federation.num-rounds": args.rounds or (2 if q else 5),
        "federation.min-replies": 1,
        "zo.lr": args.lr or 1e-3,
        "zo.tune": "no-embeddings",
        "zo.local-steps": args.local_steps or (2 if q else 8),
        "zo.batch-size": 2 if q else 4,
        "fedkseed.num-seeds": num_seeds,
    }
    aggregators = [a for a in available_aggregators() if not q or a in QUICK_AGGREGATORS]
    attacks = list(QUICK_ATTACKS if q else ATTACKS)
    byzantine = set(range(1000, 1000 + f))  # LocalGrid node ids are 1000 + partition id
    clock = Stopwatch()
    results: list[dict[str, Any]] = []
    initial = float("nan")
    for agg in aggregators:
        for attack in attacks:
            cfg = make_config({**flat, "aggregator.name": agg, **aggregator_options(agg, f=f, n=n)})
            tamper = make_tamper(attack, byzantine, num_seeds=num_seeds, run_seed=cfg.run.seed)
            summary = run_federated(cfg, tamper=tamper)
            initial = number(summary.get("initial_heldout_loss"))
            loss = number(summary.get("final_heldout_loss"))
            results.append({"aggregator": agg, "attack": attack, "f": f, "n": n, "heldout_loss": loss})
            print(
                f"[{clock():7.1f} s] {agg:14s} {attack:10s} held-out loss {initial:.4f} -> {loss:.4f}",
                flush=True,
            )
    out = {
        "results": results,
        "initial_heldout_loss": initial,
        "aggregators": aggregators,
        "attacks": attacks,
        "byzantine_node_ids": sorted(byzantine),
        "config": {k: v for k, v in flat.items() if not k.startswith("run.")},
        "quick": q,
        "wall_s": clock(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
