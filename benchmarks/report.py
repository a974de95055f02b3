"""Matched-budget comparison: untuned, FedKSeed, FedKSeed-Pro, LoRA-FedAvg and centralized MeZO.

Every method sees the same model, data, partitions, rounds, clients per round and local steps;
centralized MeZO takes as many ZO steps as all FedKSeed clients together, on the union of their
data. Bytes are measured from the real messages (payload up + down per client-round).

Each method runs in its own worker process (this script with ``--worker METHOD``; ``--quick``
runs them in-process to stay under a minute), so its peak RSS is its own and not the running
maximum of the methods before it. In a worker the server, its evaluator and the clients share
one process: the peak is an upper bound on a deployed client's.

Writes ``<out>/report.md``, ``<out>/report.json``, ``<out>/loss_vs_rounds.png`` and
``<out>/loss_vs_bytes.png``.

``--task qa --heldout-groups G1,G2`` runs the same comparison on the chatterbot Q/A with whole
categories held out of every client's data: each row then also has the final zero-shot loss and
Rouge-L on those categories (untuned: the initial ones), and ``<out>/zeroshot_vs_rounds.png``.
``--methods`` picks a subset (``untuned`` is read off the first federated run).

Usage: python benchmarks/report.py [--quick] [--out DIR] [--task T --heldout-groups G1,G2]
       [--methods untuned,fedkseed,...]   (last line: one JSON object)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import Stopwatch, make_config, number, run_federated, run_metrics, setup_environment

from fedtune.config import RunConfig

Curve = list[tuple[float, float]]
FEDERATED = ("fedkseed", "fedkseed-compact", "fedkseed-pro", "lora-fedavg")
METHODS = (*FEDERATED, "mezo")
CHOICES = ("untuned", *METHODS)  # what --methods may name
ZEROSHOT = ("zeroshot_loss", "zeroshot_rouge_l")  # extra row keys when data.heldout-groups is set
ROW_NAMES = {"mezo": "mezo (centralized)", "fedkseed-compact": "fedkseed (compact wire)"}
# FedKSeed with the compact wire: fp16 scalars up, sparse accumulator deltas down.
COMPACT: dict[str, Any] = {
    "run.algorithm": "fedkseed",
    "fedkseed.reply-scalars": "float16",
    "fedkseed.sparse-sync": True,
}
_MEZO_TAG = 0x4D455A4F  # "MEZO": the centralized baseline's batch order, apart from every client's


def zeroshot_values(summary: dict[str, Any], which: str) -> dict[str, float]:
    """``which`` = final or initial zero-shot metrics; {} for a run without held-out groups."""
    if "final_zeroshot_loss" not in summary:
        return {}
    return {key: number(summary.get(f"{which}_{key}")) for key in ZEROSHOT}


def federated_row(summary: dict[str, Any]) -> dict[str, float]:
    return {
        "heldout_loss": number(summary.get("final_heldout_loss")),
        "rouge_l": number(summary.get("final_rouge_l")),
        "payload_bytes_per_client_round": number(summary.get("mean_payload_bytes_up"))
        + number(summary.get("mean_payload_bytes_down")),
        "client_peak_mb": number(summary.get("client_peak_mb")),
        "seconds_per_round": number(summary.get("mean_round_s")),
        **zeroshot_values(summary, "final"),
    }


def zeroshot_curve(summary: dict[str, Any]) -> Curve:
    """(round, zero-shot loss) from ``metrics.jsonl``; empty without held-out groups."""
    pts = [(number(r.get("round")), number(r.get("zeroshot_loss"))) for r in run_metrics(summary)]
    return [(x, y) for x, y in pts if not math.isnan(y)]


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

    from fedtune.algorithms.rounds import peak_rss_mb
    from fedtune.assets.models import load_causal_lm, load_tokenizer
    from fedtune.data.node import NodeData
    from fedtune.eval import HeldoutEvaluator
    from fedtune.experiment import build_federated_data
    from fedtune.zo import ParamSelection, ZOConfig, train_zo

    data = build_federated_data(cfg)
    train = concatenate_datasets(list(data.train_partitions))
    model = load_causal_lm(cfg.model.name, num_layers=cfg.model.num_layers or None)
    tokenizer = load_tokenizer(cfg.model.name)
    evaluator = HeldoutEvaluator.for_run(tokenizer, data.heldout, cfg)
    # The same batch stream a client uses (cfg.data.sampling), over the union of the partitions.
    batch = NodeData(train, sampling=cfg.data.sampling).batches(
        tokenizer,
        batch_size=cfg.zo.batch_size,
        max_length=cfg.model.max_length,
        key=(cfg.run.seed, _MEZO_TAG),
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
    if data.zeroshot is not None:  # final values only, as for the federated rows
        zs = HeldoutEvaluator.for_run(tokenizer, data.zeroshot, cfg, zeroshot=True)(model)
        row.update({"zeroshot_loss": zs.heldout_loss, "zeroshot_rouge_l": zs.rouge_l})
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
    """The report's table; zero-shot columns only when the rows carry them (held-out groups)."""
    zs = any("zeroshot_loss" in r for r in rows.values())
    zs_head = " zero-shot answer loss | zero-shot Rouge-L |" if zs else ""
    lines = [
        f"| method | held-out answer loss | Rouge-L |{zs_head} payload bytes / client-round "
        "| client peak MB | s / round |",
        "|---|---:|---:|" + ("---:|---:|" if zs else "") + "---:|---:|---:|",
    ]
    for name, r in rows.items():
        zs_cells = (
            f" {fmt(r.get('zeroshot_loss', math.nan), '.4f')} | "
            f"{fmt(r.get('zeroshot_rouge_l', math.nan), '.2f')} |"
            if zs
            else ""
        )
        lines.append(
            f"| {name} | {fmt(r['heldout_loss'], '.4f')} | {fmt(r['rouge_l'], '.2f')} |{zs_cells} "
            f"{fmt(r['payload_bytes_per_client_round'], ',.0f')} | {fmt(r['client_peak_mb'], '.0f')} | "
            f"{fmt(r['seconds_per_round'], '.2f')} |"
        )
    return "\n".join(lines)


def plot(
    curves: dict[str, Curve],
    path: Path,
    *,
    xlabel: str,
    log_x: bool = False,
    baseline: float | None = None,
    ylabel: str = "held-out answer loss",
) -> None:
    """Loss curves; with ``log_x`` the x = 0 start point is dropped and shown as the ``baseline`` line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        shown = [(x, y) for x, y in pts if x > 0] if log_x else pts
        if shown:
            ax.plot([x for x, _ in shown], [y for _, y in shown], marker="o", label=name)
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="untuned")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if log_x else "major")
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
    p.add_argument("--task", default="reviews", help="data.task (reviews, qa, ...)")
    p.add_argument(
        "--heldout-groups",
        default="",
        help="data.heldout-groups: comma-separated groups (qa: categories) held out for zero-shot eval",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="data.max-new-tokens for the in-distribution Rouge-L (default 6 for reviews, 32 otherwise)",
    )
    p.add_argument(
        "--zeroshot-max-new-tokens",
        type=int,
        default=None,
        help="data.zeroshot-max-new-tokens (default 32, as data.max-new-tokens; the paper uses 128)",
    )
    p.add_argument("--heldout-size", type=int, default=None, help="data.heldout-size (also caps zero-shot)")
    p.add_argument("--eval-generations", type=int, default=None, help="data.eval-generations")
    p.add_argument(
        "--methods",
        type=method_list,
        default=CHOICES,
        help=f"comma-separated subset of {','.join(CHOICES)} (default: all)",
    )
    p.add_argument(
        "--sampling",
        choices=("shuffle", "class-balanced"),
        default="shuffle",
        help="data.sampling for every method (the 2026-11-29 report used class-balanced)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse <out>/rows/METHOD.json written earlier with the same settings (resume a long run)",
    )
    p.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def method_list(text: str) -> tuple[str, ...]:
    """``--methods``: known names, run in the report's own order whatever order they are given in."""
    names = {m.strip() for m in text.split(",") if m.strip()}
    unknown = sorted(names - set(CHOICES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown or no methods {unknown}; choose from {', '.join(CHOICES)}")
    if not names & set(FEDERATED) and "untuned" in names:
        raise argparse.ArgumentTypeError("untuned is read off a federated run; name one of them too")
    return tuple(m for m in CHOICES if m in names)


def shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flat run config every method shares (``run.algorithm`` is set per method).

    The reviews defaults add no keys, so their settings (and ``--reuse`` of their rows) are as before.
    """
    q = args.quick
    out = Path(args.out)
    steps = args.local_steps or (2 if q else 6)
    # Reviews answers are one word; Q/A answers are sentences (99% within 28 SmolLM2 tokens).
    new_tokens = 6 if args.task == "reviews" else 32
    task: dict[str, Any] = {} if args.task == "reviews" else {"data.task": args.task}
    if args.heldout_groups:
        task["data.heldout-groups"] = args.heldout_groups
        task["data.zeroshot-max-new-tokens"] = args.zeroshot_max_new_tokens or (4 if q else 32)
    return {
        "run.name": "report",
        "run.output-dir": str(out / "runs"),
        **task,
        "model.num-layers": args.num_layers if args.num_layers is not None else (2 if q else 0),
        "model.max-length": 48 if q else 96,
        "data.max-train-examples": 60 if q else 2000,
        "data.heldout-size": args.heldout_size or (8 if q else 64),
        "data.eval-generations": args.eval_generations
        if args.eval_generations is not None
        else (2 if q else 32),
        "data.max-new-tokens": args.max_new_tokens or (2 if q else new_tokens),
        "federation.num-clients": args.clients or (3 if q else 10),
        "federation.clients-per-round": args.clients_per_round or 3,
        "federation.num-rounds": args.rounds or (2 if q else 10),
        "zo.lr": args.lr or (1e-4 if q else 3e-6),
        "zo.local-steps": steps,
        "zo.batch-size": 2 if q else 8,
        "lora.local-steps": steps,
        "lora.batch-size": 2 if q else 8,
        "fedkseed.num-seeds": args.num_seeds or (64 if q else 4096),
        "data.sampling": args.sampling,
    }


def run_method(method: str, flat: dict[str, Any]) -> dict[str, Any]:
    """One method in this process: its row, its two curves and (federated runs) the untuned row."""
    if method == "mezo":
        row, curve = run_mezo(make_config(flat))
        return {"row": row, "by_round": curve, "by_bytes": [], "untuned": None}
    overrides: dict[str, Any] = COMPACT if method == "fedkseed-compact" else {"run.algorithm": method}
    summary = run_federated(make_config({**flat, **overrides}))
    by_round, by_bytes = federated_curves(summary)
    untuned = {
        "heldout_loss": number(summary.get("initial_heldout_loss")),
        "rouge_l": number(summary.get("initial_rouge_l")),
        "payload_bytes_per_client_round": 0.0,
        "client_peak_mb": float("nan"),
        "seconds_per_round": float("nan"),
        **zeroshot_values(summary, "initial"),
    }
    row = federated_row(summary)
    result = {"row": row, "by_round": by_round, "by_bytes": by_bytes, "untuned": untuned}
    zs = zeroshot_curve(summary)
    return {**result, "zeroshot_by_round": zs} if zs else result


def run_worker(method: str, flat: dict[str, Any], out: Path) -> None:
    """``--worker METHOD``: runs it and writes ``<out>/rows/<method>.json`` for the parent."""
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    written = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result = finite_or_none({**run_method(method, flat), "config": flat, "written_utc": written})
    (rows_dir / f"{method}.json").write_text(json.dumps(result), encoding="utf-8")


def run_in_worker(
    method: str, argv: Sequence[str], out: Path, *, reuse_if: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Runs one method in a fresh interpreter and reads back what it wrote.

    With ``reuse_if``, a row a previous worker wrote with exactly these settings is read instead.
    """
    path = out / "rows" / f"{method}.json"
    if reuse_if is not None and path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous.get("config") == reuse_if:
            print(f"reusing {path} (same settings)", flush=True)
            return {**_numeric_rows(previous), "reused": True}
    path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", method]
    proc = subprocess.run(command, check=False)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(
            f"the {method} worker failed (exit {proc.returncode}); its traceback is above. Rerun it "
            f"alone with `python benchmarks/report.py {' '.join(argv)} --worker {method}`"
        )
    return _numeric_rows(json.loads(path.read_text(encoding="utf-8")))


def _numeric_rows(loaded: dict[str, Any]) -> dict[str, Any]:
    """JSON null (a NaN on the way out) back to NaN in the row dicts."""
    for key in ("row", "untuned"):
        if loaded.get(key) is not None:
            loaded[key] = {k: number(v) for k, v in loaded[key].items()}
    return loaded


def targets_text(bytes_ratio: float, rouge_gap: float, compact_ratio: float | None = None) -> str:
    met_bytes = "met" if bytes_ratio >= 1000 else "missed"
    met_rouge = "met" if rouge_gap >= -0.5 else "missed"
    compact = ""
    if compact_ratio is not None and math.isfinite(compact_ratio):
        met_compact = "met" if compact_ratio >= 1000 else "missed"
        compact = f"; {compact_ratio:,.0f}x with FedKSeed's compact wire ({met_compact})"
    return (
        f"- Bytes: LoRA-FedAvg moves {bytes_ratio:,.0f}x more per client-round than FedKSeed "
        f"(target: at least 1000x; {met_bytes}){compact}.\n"
        f"- Rouge-L: FedKSeed minus LoRA-FedAvg = {rouge_gap:+.2f} points "
        f"(target: within 0.5; {met_rouge}).\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setup_environment(threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flat = shared_settings(args)
    if args.worker is not None:
        run_worker(args.worker, flat, out)
        return

    clock = Stopwatch()
    started = datetime.datetime.now(datetime.UTC)
    rows: dict[str, dict[str, float]] = {}
    by_round: dict[str, Curve] = {}
    by_bytes: dict[str, Curve] = {}
    zs_by_round: dict[str, Curve] = {}
    untuned: dict[str, float] | None = None
    reused: list[str] = []
    for method in (m for m in METHODS if m in args.methods):
        # --quick stays in one interpreter to keep under a minute (a worker costs ~10 s of imports);
        # its peak-memory column is then the running maximum over the methods.
        if args.quick:
            result = run_method(method, flat)
        else:
            worker_argv = [a for a in argv if a != "--reuse"]
            result = run_in_worker(method, worker_argv, out, reuse_if=flat if args.reuse else None)
        name = ROW_NAMES.get(method, method)
        if result.get("reused"):
            reused.append(f"{name} ({result.get('written_utc') or 'an earlier run'})")
        rows[name] = result["row"]
        by_round[name] = [(float(x), float(y)) for x, y in result["by_round"]]
        if result["by_bytes"]:
            by_bytes[name] = [(float(x), float(y)) for x, y in result["by_bytes"]]
        if result.get("zeroshot_by_round"):
            zs_by_round[name] = [(float(x), float(y)) for x, y in result["zeroshot_by_round"]]
        untuned = untuned or result["untuned"]
        print(f"[{clock():7.1f} s] {method}: {json.dumps(finite_or_none(rows[name]))}", flush=True)
    if "untuned" in args.methods:
        if untuned is None:
            raise RuntimeError("no federated worker reported the untuned model's metrics")
        rows = {"untuned": untuned, **rows}

    # The targets compare FedKSeed with LoRA-FedAvg; a --methods subset without both states none.
    bytes_ratio = compact_ratio = rouge_gap = math.nan
    if "fedkseed" in rows and "lora-fedavg" in rows:
        fk, lora = rows["fedkseed"], rows["lora-fedavg"]
        bytes_ratio = lora["payload_bytes_per_client_round"] / fk["payload_bytes_per_client_round"]
        rouge_gap = fk["rouge_l"] - lora["rouge_l"]
        if "fedkseed (compact wire)" in rows:
            compact_ratio = (
                lora["payload_bytes_per_client_round"]
                / rows["fedkseed (compact wire)"]["payload_bytes_per_client_round"]
            )
    targets = "" if math.isnan(bytes_ratio) else targets_text(bytes_ratio, rouge_gap, compact_ratio) + "\n"
    table = markdown_table(rows)
    cfg_lines = "\n".join(f"- `{k} = {v}`" for k, v in flat.items() if not k.startswith("run."))
    command = " ".join(["python benchmarks/report.py", *argv])
    wall_min = clock() / 60
    reused_text = f"Rows reused from earlier workers with the same settings: {', '.join(reused)}.\n\n"
    peak_text = (
        "peak RSS of this one process, a running maximum over the methods in table order (--quick)."
        if args.quick
        else "peak RSS of the method's worker process, which holds the server, its evaluator and the "
        "simulated clients (an upper bound on one deployed client's)."
    )
    zs_text = (
        f"Zero-shot: the groups `{args.heldout_groups}` of task `{args.task}` never reach a client; "
        "up to `data.heldout-size` of their rows are scored like the held-out split, with up to "
        "`data.zeroshot-max-new-tokens` new tokens (final round; untuned: round 0).\n\n"
        if args.heldout_groups
        else ""
    )
    (out / "report.md").write_text(
        f"# fedtune matched-budget report\n\n"
        f"`{command}`, started {started:%Y-%m-%d %H:%M} UTC, {wall_min:.0f} minutes.\n\n"
        f"{reused_text if reused else ''}{table}\n\n"
        f"{targets}{zs_text}"
        "Payload bytes: mean (up + down) per client per round, measured from the messages. "
        f"Client peak MB: {peak_text} Compact wire: `fedkseed.reply-scalars = float16`, "
        "`fedkseed.sparse-sync = true`. MeZO is centralized, so it moves no bytes.\n\n"
        f"Settings (shared by every method):\n\n{cfg_lines}\n",
        encoding="utf-8",
    )
    plot(by_round, out / "loss_vs_rounds.png", xlabel="round (MeZO: round-equivalents of steps)")
    untuned_loss = untuned["heldout_loss"] if untuned else None
    if by_bytes:
        plot(
            by_bytes,
            out / "loss_vs_bytes.png",
            xlabel="cumulative payload bytes per client (up + down)",
            log_x=True,
            baseline=untuned_loss,
        )
    if zs_by_round:
        plot(zs_by_round, out / "zeroshot_vs_rounds.png", xlabel="round", ylabel="zero-shot answer loss")
    print(table)
    result_json = {
        "rows": rows,
        "bytes_ratio_lora_over_fedkseed": bytes_ratio,
        "bytes_ratio_lora_over_fedkseed_compact": compact_ratio,
        "rouge_l_gap_fedkseed_minus_lora": rouge_gap,
        **({"task": args.task, "heldout_groups": args.heldout_groups} if args.heldout_groups else {}),
        "config": {k: v for k, v in flat.items() if not k.startswith("run.")},
        "command": command,
        "reused_rows": reused,
        "started_utc": started.isoformat(timespec="seconds"),
        "out": str(out),
        "quick": args.quick,
        "wall_s": clock(),
    }
    final = finite_or_none(result_json)
    (out / "report.json").write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(final))


if __name__ == "__main__":
    main()
