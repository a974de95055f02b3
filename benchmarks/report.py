"""Matched-budget comparison: untuned, FedKSeed, FedKSeed-Pro, LoRA-FedAvg and centralized MeZO.

Every method sees the same model, data, partitions, rounds, clients per round and local steps;
centralized MeZO takes as many ZO steps as all FedKSeed clients together, on the union of their
data. Bytes are measured from the real messages (payload up + down per client-round).
Client peak memory is the process's peak RSS, which only grows within one process: methods run
in the order listed, so later rows carry the peaks of earlier ones.

Writes ``<out>/report.md``, ``<out>/loss_vs_rounds.png`` and ``<out>/loss_vs_bytes.png``.

Usage: python benchmarks/report.py [--quick] [--out DIR]   (last line: one JSON object)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import Stopwatch, make_config, number, run_federated, run_metrics, setup_environment

from fedtune.config import RunConfig

Curve = list[tuple[float, float]]
FEDERATED = ("fedkseed", "fedkseed-pro", "lora-fedavg")
_MEZO_TAG = 0x4D455A4F  # "MEZO": the centralized baseline's batch order, apart from every client's


def federated_row(summary: dict[str, Any]) -> dict[str, float]:
    return {
        "heldout_loss": number(summary.get("final_heldout_loss")),
        "rouge_l": number(summary.get("final_rouge_l")),
        "payload_bytes_per_client_round": number(summary.get("mean_payload_bytes_up"))
        + number(summary.get("mean_payload_bytes_down")),
        "client_peak_mb": number(summary.get("client_peak_mb")),
        "seconds_per_round": number(summary.get("mean_round_s")),
    }


def federated_curves(summary: dict[str, Any]) -> tuple[Curve, Curve]:
    """(round, loss) and (cumulative payload bytes per client, loss) from ``metrics.jsonl``."""
    rounds: Curve = []
    by_bytes: Curve = []
    total = 0.0
    for rec in run_metrics(summary):
        loss = number(rec.get("heldout_loss"))
        if math.isnan(loss):
            continue
        up, down = number(rec.get("payload_bytes_up")), number(rec.get("payload_bytes_down"))
        total += 0.0 if math.isnan(up + down) else up + down
        rounds.append((number(rec.get("round")), loss))
        by_bytes.append((total, loss))
    return rounds, by_bytes


def run_mezo(cfg: RunConfig) -> tuple[dict[str, float], Curve]:
    """Centralized MeZO on the union of the partitions, evaluated every round-equivalent of steps."""
    import time

    from datasets import concatenate_datasets

    from fedtune.assets.models import load_causal_lm, load_tokenizer
    from fedtune.data.batch import TokenBatch
    from fedtune.data.collate import encode_examples
    from fedtune.data.sampler import BatchSampler
    from fedtune.eval import HeldoutEvaluator
    from fedtune.experiment import build_federated_data
    from fedtune.fedkseed.client import peak_rss_mb
    from fedtune.zo import ParamSelection, ZOConfig, train_zo

    data = build_federated_data(cfg)
    train = concatenate_datasets(list(data.train_partitions))
    model = load_causal_lm(cfg.model.name, num_layers=cfg.model.num_layers or None)
    tokenizer = load_tokenizer(cfg.model.name)
    evaluator = HeldoutEvaluator.for_run(tokenizer, data.heldout, cfg)
    prompts, answers = list(train["prompt"]), list(train["answer"])
    sampler = BatchSampler(
        num_examples=len(train),
        batch_size=min(cfg.zo.batch_size, len(train)),
        key=(cfg.run.seed, _MEZO_TAG),
        labels=list(train["label"]),
    )

    def batch(_step: int) -> TokenBatch:
        idx = sampler.next_indices()
        return encode_examples(
            tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx], max_length=cfg.model.max_length
        )

    fed = cfg.federation
    per_round = fed.clients_per_round * cfg.zo.local_steps
    curve: Curve = [(0.0, evaluator.loss(model))]
    seconds: list[float] = []
    zo_cfg = ZOConfig(eps=cfg.zo.eps, kind=cfg.zo.perturbation)  # type: ignore[arg-type]
    for rnd in range(1, fed.num_rounds + 1):
        t0 = time.perf_counter()
        # One train_zo call per round-equivalent; a per-round seed keeps the direction streams apart.
        train_zo(
            model,
            selection=ParamSelection(mode=cfg.zo.tune),  # type: ignore[arg-type]
            config=zo_cfg,
            batches=batch,
            steps=per_round,
            lr=cfg.zo.lr_at(rnd, fed.num_rounds),
            run_seed=cfg.run.seed + rnd,
        )
        seconds.append(time.perf_counter() - t0)
        curve.append((float(rnd), evaluator.loss(model)))
    final = evaluator(model)
    row = {
        "heldout_loss": final.heldout_loss,
        "rouge_l": final.rouge_l,
        "payload_bytes_per_client_round": 0.0,
        "client_peak_mb": peak_rss_mb(),
        "seconds_per_round": sum(seconds) / len(seconds),
    }
    return row, curve


def finite_or_none(value: Any) -> Any:
    """NaN/inf -> None recursively, so the last line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return value


def fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| method | held-out answer loss | Rouge-L | payload bytes / client-round "
        "| client peak MB | s / round |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {fmt(r['heldout_loss'], '.4f')} | {fmt(r['rouge_l'], '.2f')} | "
            f"{fmt(r['payload_bytes_per_client_round'], ',.0f')} | {fmt(r['client_peak_mb'], '.0f')} | "
            f"{fmt(r['seconds_per_round'], '.2f')} |"
        )
    return "\n".join(lines)


def plot(curves: dict[str, Curve], path: Path, *, xlabel: str, log_x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    if log_x:
        ax.set_xscale("symlog")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out answer loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2-layer slice, 2 rounds, 3 clients, few steps")
    p.add_argument("--out", default="benchmarks/results/report", help="folder for report.md and plots")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=None, help="SmolLM2 layers kept (0 = all)")
    p.add_argument("--clients", type=int, default=None, help="federation.num-clients")
    p.add_argument("--clients-per-round", type=int, default=None)
    p.add_argument("--local-steps", type=int, default=None, help="ZO and LoRA steps per client-round")
    p.add_argument("--lr", type=float, default=None, help="zo.lr (LoRA keeps lora.lr)")
    p.add_argument("--num-seeds", type=int, default=None, help="K")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_environment(threads=args.threads)
    q = args.quick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.local_steps or (2 if q else 6)
    flat: dict[str, Any] = {
        "run.name": "report",
        "run.output-dir": str(out / "runs"),
        "model.num-layers": args.num_layers if args.num_layers is not None else (2 if q else 0),
        "model.max-length": 48 if q else 96,
        "data.max-train-examples": 60 if q else 2000,
        "data.heldout-size": 8 if q else 64,
        "data.eval-generations": 2 if q else 32,
        "data.max-new-tokens": 2 if q else 6,
        "federation.num-clients": args.clients or (3 if q else 10),
        "federation.clients-per-round": args.clients_per_round or 3,
        "federation.num-rounds": args.rounds or (2 if q else 10),
        "zo.lr": args.lr or (1e-4 if q else 3e-6),
        "zo.local-steps": steps,
        "zo.batch-size": 2 if q else 8,
        "lora.local-steps": steps,
        "lora.batch-size": 2 if q else 8,
        "fedkseed.num-seeds": args.num_seeds or (64 if q else 4096),
    }
    clock = Stopwatch()
    rows: dict[str, dict[str, float]] = {}
    by_round: dict[str, Curve] = {}
    by_bytes: dict[str, Curve] = {}
    untuned: dict[str, float] = {}
    for algo in FEDERATED:
        cfg = make_config({**flat, "run.algorithm": algo})
        summary = run_federated(cfg)
        rows[algo] = federated_row(summary)
        by_round[algo], by_bytes[algo] = federated_curves(summary)
        if not untuned:
            untuned = {
                "heldout_loss": number(summary.get("initial_heldout_loss")),
                "rouge_l": number(summary.get("initial_rouge_l")),
                "payload_bytes_per_client_round": 0.0,
                "client_peak_mb": float("nan"),
                "seconds_per_round": float("nan"),
            }
        print(f"[{clock():7.1f} s] {algo}: {json.dumps(finite_or_none(rows[algo]))}", flush=True)
    rows["mezo (centralized)"], by_round["mezo (centralized)"] = run_mezo(make_config(flat))
    print(f"[{clock():7.1f} s] mezo: {json.dumps(rows['mezo (centralized)'])}", flush=True)
    rows = {"untuned": untuned, **rows}

    table = markdown_table(rows)
    cfg_lines = "\n".join(f"- `{k} = {v}`" for k, v in flat.items() if not k.startswith("run."))
    (out / "report.md").write_text(
        f"# fedtune matched-budget report\n\n{table}\n\n"
        "Payload bytes: mean (up + down) per client per round, measured from the messages. "
        "Client peak MB: process peak RSS (cumulative across the methods, run in table order). "
        "MeZO is centralized, so it moves no bytes.\n\n"
        f"Settings (shared by every method):\n\n{cfg_lines}\n",
        encoding="utf-8",
    )
    plot(by_round, out / "loss_vs_rounds.png", xlabel="round (MeZO: round-equivalents of steps)")
    plot(by_bytes, out / "loss_vs_bytes.png", xlabel="cumulative payload bytes per client", log_x=True)
    print(table)
    fk, lora = rows["fedkseed"], rows["lora-fedavg"]
    result = {
        "rows": rows,
        "bytes_ratio_lora_over_fedkseed": lora["payload_bytes_per_client_round"]
        / fk["payload_bytes_per_client_round"],
        "rouge_l_gap_fedkseed_minus_lora": fk["rouge_l"] - lora["rouge_l"],
        "config": {k: v for k, v in flat.items() if not k.startswith("run.")},
        "out": str(out),
        "quick": q,
        "wall_s": clock(),
    }
    print(json.dumps(finite_or_none(result)))


if __name__ == "__main__":
    main()
