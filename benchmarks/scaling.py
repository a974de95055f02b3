"""How the engine's and the server's costs grow: with tuned parameters, non-zero seeds and clients per round.

Usage: ``python benchmarks/scaling.py [--quick] [--out DIR]``. The last printed line is one JSON object;
``DIR/scaling.json`` and ``DIR/scaling.png`` hold the same figures.

* **params**: one MeZO step (both kinds) over two forward passes, and a replay of ``--params-seeds`` non-zero
  seeds, on the 2-layer SmolLM2 slice, SmolLM2-135M and a randomly initialised Llama-shaped model of about
  500M parameters built from a config (no download). ``--quick``: the slice and a 4-layer random model.
* **seeds**: replay time against the number of non-zero seeds (32 to 4096, both kinds), on the 2-layer
  slice. A least-squares line through the points gives ``s_per_seed`` and ``r2``; linear growth means
  ``r2`` near 1.
* **server**: one FedKSeed round at K = 4096 and tau = 200 through the public server API without models:
  building the sync payloads, decoding and validating every reply, aggregating, and writing the checkpoint,
  for 10 to 10,000 clients per round and each registered aggregator (Krum and Multi-Krum, quadratic in
  clients, stop at ``--krum-max-clients``). ``growth_exponent`` is the log-log slope of time over clients.
* **memory**: the server state's bytes over rounds with sparse syncs and 10 of 1,000 nodes per round.

Every time is the median of ``--reps`` repetitions (min and max alongside).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from _timing import interleaved, summarize
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from zo_step import LR, random_batch

from fedtune.aggregators import available_aggregators, create_aggregator
from fedtune.algorithms.base import NodeReply
from fedtune.assets.models import load_causal_lm
from fedtune.fedkseed.server import SYNC_HISTORY_ROUNDS, FedKSeedServer, RoundSettings
from fedtune.runtime.checkpoint import Checkpoint, save_checkpoint
from fedtune.wire.codec import ReplyPayload, encode_reply
from fedtune.zo import (
    MeZOStep,
    ParamSelection,
    Perturbation,
    ZOConfig,
    answer_loss,
    replay,
    select_parameters,
)

KINDS = ("rademacher", "gaussian")
K, TAU = 4096, 200
QUADRATIC = ("krum", "multi-krum")


def progress(message: str) -> None:
    """One line per finished stage on stderr, so stdout's last line stays the JSON."""
    print(f"[scaling] {message}", file=sys.stderr, flush=True)


def random_llama(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int) -> PreTrainedModel:
    """A Llama-shaped model from a config with SmolLM2's vocabulary, weights N(0, 0.02) from a generator."""
    config = LlamaConfig(
        vocab_size=49_152,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # HF's init draws from the global RNG; we overwrite it
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(500)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name:
                param.fill_(1.0)
    model.train(False)
    return model


def coefficients(count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    draws = np.random.Generator(np.random.PCG64(np.random.SeedSequence([11, count, k])))
    return np.sort(draws.choice(k, count, replace=False)), draws.normal(0.0, 1e-7, count)


def params_point(name: str, model: PreTrainedModel, seeds: int, reps: int) -> dict[str, Any]:
    """Step over two forwards, and replay time, for one model."""
    tuned = select_parameters(model, ParamSelection())
    batch = random_batch(model.config.vocab_size)
    steppers = {kind: MeZOStep(model, tuned, ZOConfig(kind=kind), run_seed=0) for kind in KINDS}  # type: ignore[arg-type]
    counter = iter(range(1_000_000))
    coef = coefficients(seeds, K)

    def two_forward() -> None:
        with torch.inference_mode():
            answer_loss(model, batch)
            answer_loss(model, batch)

    jobs: dict[str, Callable[[], object]] = {"two_forward": two_forward}
    for kind, stepper in steppers.items():
        jobs[f"step_{kind}"] = lambda s=stepper: s.step(batch, next(counter), LR)  # type: ignore[misc]
        perturbation = Perturbation(kind=kind, run_seed=0, shapes=tuned.shapes)  # type: ignore[arg-type]
        jobs[f"replay_{kind}"] = lambda p=perturbation: replay(tuned, p, coef)  # type: ignore[misc]
    times = interleaved(jobs, reps)
    two = times["two_forward"]["median"]
    row: dict[str, Any] = {"model": name, "num_params": tuned.numel, "replay_seeds": seeds, "times": times}
    for kind in KINDS:
        row[f"step_over_two_forward_{kind}"] = round(times[f"step_{kind}"]["median"] / two, 3)
        row[f"replay_s_per_seed_{kind}"] = round(times[f"replay_{kind}"]["median"] / seeds, 5)
        row[f"replay_ns_per_param_seed_{kind}"] = round(
            times[f"replay_{kind}"]["median"] / seeds / tuned.numel * 1e9, 3
        )
    return row


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    slope, intercept = np.polyfit(xs, ys, 1)
    predicted = np.polyval([slope, intercept], xs)
    total = float(np.sum((np.asarray(ys) - np.mean(ys)) ** 2))
    r2 = 1.0 - float(np.sum((np.asarray(ys) - predicted) ** 2)) / total if total > 0 else 1.0
    return {
        "s_per_seed": round(float(slope), 6),
        "intercept_s": round(float(intercept), 4),
        "r2": round(r2, 4),
    }


def seeds_sweep(model: PreTrainedModel, counts: dict[str, list[int]], reps: int) -> dict[str, Any]:
    tuned = select_parameters(model, ParamSelection())
    out: dict[str, Any] = {"num_params": tuned.numel}
    for kind, points in counts.items():
        perturbation = Perturbation(kind=kind, run_seed=0, shapes=tuned.shapes)  # type: ignore[arg-type]
        replay(tuned, perturbation, coefficients(2, K))  # warm-up
        rows: list[dict[str, Any]] = []
        for count in points:
            coef = coefficients(count, max(K, count))

            def job(c: tuple[np.ndarray, np.ndarray] = coef, p: Perturbation = perturbation) -> None:
                replay(tuned, p, c)

            times = interleaved({"replay": job}, reps, warmup=False)
            rows.append({"nonzero_seeds": count, "replay_s": times["replay"]})
            progress(f"seeds: {kind} {count} in {times['replay']['median']:.2f} s")
        fit = linear_fit([r["nonzero_seeds"] for r in rows], [r["replay_s"]["median"] for r in rows])
        out[kind] = {"points": rows, **fit}
    return out


def client_replies(clients: int, server_round: int) -> list[NodeReply]:
    """Encoded replies of ``clients`` nodes, each with tau steps on random seeds (untimed client side)."""
    draws = np.random.Generator(np.random.PCG64(np.random.SeedSequence([13, clients, server_round])))
    replies = []
    for node in range(1, clients + 1):
        payload = ReplyPayload(
            server_round=server_round,
            num_seeds=K,
            num_examples=int(draws.integers(50, 200)),
            seed_indices=draws.integers(0, K, TAU).astype(np.int64),
            projected_grads=draws.normal(0.0, 1.0, TAU).astype(np.float32),
            train_loss=2.0,
            num_skipped_steps=0,
            peak_memory_mb=100.0,
            fingerprint="scaling",
        )
        replies.append(NodeReply(node, payload=encode_reply(payload)))
    return replies


def make_server(aggregator: str) -> FedKSeedServer:
    def settings(server_round: int) -> RoundSettings:
        return RoundSettings(server_round, lr=1e-5, eps=5e-4, num_local_steps=TAU, batch_size=8)

    return FedKSeedServer(
        num_seeds=K,
        aggregator=create_aggregator(aggregator),
        fingerprint="scaling",
        settings=settings,
        sparse_sync=True,
    )


def server_round_times(aggregator: str, clients: int, reps: int, run_dir: Path) -> dict[str, Any]:
    """Phases of ``reps`` rounds after one warm-up round, each with fresh replies."""
    server = make_server(aggregator)
    nodes = list(range(1, clients + 1))
    phases: dict[str, list[float]] = {"sync": [], "aggregate": [], "checkpoint": [], "total": []}
    for server_round in range(1, reps + 2):
        replies = client_replies(clients, server_round)
        start = time.perf_counter()
        server.configure(server_round, nodes)
        synced = time.perf_counter()
        outcome = server.aggregate(server_round, replies, min_replies=1)
        aggregated = time.perf_counter()
        save_checkpoint(run_dir, Checkpoint(server_round, server.state_dict(), {"round": server_round}))
        done = time.perf_counter()
        if len(outcome.accepted) != clients:
            raise RuntimeError(f"{aggregator} at {clients} clients accepted {len(outcome.accepted)}")
        if server_round > 1:
            for key, value in (
                ("sync", synced - start),
                ("aggregate", aggregated - synced),
                ("checkpoint", done - aggregated),
                ("total", done - start),
            ):
                phases[key].append(value)
    return {"clients": clients, **{key: summarize(values) for key, values in phases.items()}}


def server_sweep(clients: list[int], krum_max: int, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedtune-scaling-") as tmp:
        for aggregator in available_aggregators():
            points = [n for n in clients if aggregator not in QUADRATIC or n <= krum_max]
            rows = [server_round_times(aggregator, n, reps, Path(tmp) / f"{aggregator}-{n}") for n in points]
            progress(f"server: {aggregator} up to {points[-1]} clients")
            xs = [math.log(r["clients"]) for r in rows if r["clients"] >= 100]
            ys = [math.log(r["total"]["median"]) for r in rows if r["clients"] >= 100]
            exponent = float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 2 else float("nan")
            out[aggregator] = {"points": rows, "growth_exponent": round(exponent, 2)}
    return out


def memory_over_rounds(rounds: int, every: int) -> list[dict[str, int]]:
    """Server state bytes as rounds pass: 10 of 1,000 nodes per round, so most nodes go stale."""
    server = make_server("weighted-mean")
    draws = np.random.Generator(np.random.PCG64(17))
    rows = []
    for server_round in range(1, rounds + 1):
        nodes = sorted(int(n) for n in draws.choice(np.arange(1, 1001), 10, replace=False))
        server.configure(server_round, nodes)
        replies = client_replies(10, server_round)
        replies = [NodeReply(node, payload=r.payload) for node, r in zip(nodes, replies, strict=True)]
        server.aggregate(server_round, replies, min_replies=1)
        if server_round % every == 0:
            state = server.state_dict()
            size = sum(v.nbytes if isinstance(v, np.ndarray) else 8 for v in state.values())
            rows.append(
                {"round": server_round, "state_bytes": int(size), "history_rounds": len(server.round_deltas)}
            )
    return rows


def bounded(memory: Sequence[dict[str, int]]) -> bool:
    """Once the sync history is full, the state stays within 5% however many rounds pass."""
    late = [m["state_bytes"] for m in memory if m["round"] >= SYNC_HISTORY_ROUNDS + 5]
    return len(late) >= 2 and max(late) <= 1.05 * min(late)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    rows = result["params"]
    for kind in KINDS:
        axes[0].plot(
            [r["num_params"] / 1e6 for r in rows],
            [r["times"][f"step_{kind}"]["median"] for r in rows],
            "o-",
            label=f"step ({kind})",
        )
        axes[0].plot(
            [r["num_params"] / 1e6 for r in rows],
            [r["times"][f"replay_{kind}"]["median"] for r in rows],
            "s--",
            label=f"replay of {rows[0]['replay_seeds']} seeds ({kind})",
        )
    axes[0].plot([r["num_params"] / 1e6 for r in rows], [r["times"]["two_forward"]["median"] for r in rows],
                 "k:", label="two forward passes")  # fmt: skip
    axes[0].set(
        xlabel="tuned parameters (M)",
        ylabel="seconds",
        title="cost vs model size",
        xscale="log",
        yscale="log",
    )
    for kind in KINDS:
        points = result["seeds"][kind]["points"]
        axes[1].plot(
            [p["nonzero_seeds"] for p in points], [p["replay_s"]["median"] for p in points], "o-", label=kind
        )
    size = result["seeds"]["num_params"] / 1e6
    axes[1].set(xlabel="non-zero seeds", ylabel="replay s", title=f"replay vs seeds ({size:.0f}M params)",
                xscale="log", yscale="log")  # fmt: skip
    for name, series in result["server"].items():
        points = series["points"]
        axes[2].plot([p["clients"] for p in points], [p["total"]["median"] for p in points], "o-", label=name)
    axes[2].axhline(2.0, color="grey", linestyle=":", label="2 s target")
    axes[2].set(xlabel="clients per round", ylabel="seconds / round", title=f"server round, K={K}, tau={TAU}",
                xscale="log", yscale="log")  # fmt: skip
    memory = result["memory"]
    axes[3].plot([m["round"] for m in memory], [m["state_bytes"] / 1e3 for m in memory], "o-")
    axes[3].set(xlabel="round", ylabel="server state (kB)", title="server state over rounds")
    for ax in axes[:3]:
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[3].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_models(quick: bool, reps: int, params_seeds: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The sections that need models: cost against model size, and replay against seeds."""
    slice_model = load_causal_lm("smollm2-135m", num_layers=2)
    models: list[tuple[str, Callable[[], PreTrainedModel]]] = [
        ("smollm2-135m 2-layer slice", lambda: slice_model)
    ]
    if quick:
        models.append(("random llama 4x256", lambda: random_llama(4, 256, 768, 4, 4)))
    else:
        models += [
            ("smollm2-135m", lambda: load_causal_lm("smollm2-135m")),
            ("random llama 30x1152 (~0.5B)", lambda: random_llama(30, 1152, 3072, 16, 4)),
        ]
    params = []
    for name, build in models:
        model = build()
        params.append(params_point(name, model, params_seeds, reps))
        progress(f"params: {name} done")
        del model
    counts = (
        {"rademacher": [32, 64, 128, 256], "gaussian": [32, 64, 128, 256]}
        if quick
        else {
            "rademacher": [32, 64, 128, 256, 512, 1024, 2048, 4096],
            "gaussian": [32, 64, 128, 256, 512, 1024, 2048, 4096],
        }
    )
    return params, seeds_sweep(slice_model, counts, 1 if quick else min(reps, 2))


def model_sections(path: str, quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The params and seeds sections of an earlier run with the same ``--quick``."""
    earlier = json.loads(Path(path).read_text(encoding="utf-8"))
    if earlier.get("benchmark") != "scaling" or earlier.get("quick") != quick:
        raise SystemExit(
            f"{path} is not a scaling.json of a run with quick={quick}; run without --reuse-models"
        )
    progress(f"params and seeds reused from {path}")
    return list(earlier["params"]), dict(earlier["seeds"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, fewer seeds and clients")
    parser.add_argument("--out", default="benchmarks/results", help="folder for scaling.json and scaling.png")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 3, quick 1)")
    parser.add_argument("--params-seeds", type=int, default=16, help="non-zero seeds of the params replays")
    parser.add_argument("--krum-max-clients", type=int, default=None)
    parser.add_argument(
        "--reuse-models",
        metavar="JSON",
        default=None,
        help="take the params and seeds sections from an earlier scaling.json (same --quick); rerun the rest",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    reps = args.reps or (1 if quick else 3)
    if args.reuse_models:
        params, seeds = model_sections(args.reuse_models, quick)
    else:
        params, seeds = measure_models(quick, reps, args.params_seeds)
    clients = [10, 100, 1000] if quick else [10, 100, 1000, 3000, 10_000]
    krum_max = args.krum_max_clients or (100 if quick else 3000)
    server = server_sweep(clients, krum_max, reps)
    memory = memory_over_rounds(100 if quick else 300, 10 if quick else 25)
    largest = max(clients)
    linear_rules = ("weighted-mean", "clipped-mean")
    result: dict[str, Any] = {
        "benchmark": "scaling",
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "params": params,
        "seeds": seeds,
        "models_reused_from": args.reuse_models,
        "server": server,
        "memory": memory,
        "targets_met": {
            "replay_linear_in_seeds(r2>=0.98)": all(seeds[k]["r2"] >= 0.98 for k in KINDS),
            f"server_{largest}_clients<2s(weighted,clipped mean)": all(
                server[r]["points"][-1]["clients"] == largest
                and server[r]["points"][-1]["total"]["median"] < 2.0
                for r in linear_rules
            ),
            "server_state_bounded_over_rounds": bounded(memory),
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(result, out / "scaling.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
