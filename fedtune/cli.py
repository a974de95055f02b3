"""The ``fedtune`` command line: simulate, partition, assets, zo-check, export."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedtune.config import RunConfig, parse_overrides


def _load_config(path: str | None, pairs: Sequence[str]) -> RunConfig:
    overrides = parse_overrides(pairs)
    if path is None:
        return RunConfig.from_flat(overrides)
    return RunConfig.load(path, overrides)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.flower.sim import simulate
    from fedtune.runtime.loop import check_config

    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.set:
            raise ValueError("--resume continues a run with its own config.toml; drop CONFIG and --set")
        if not (run_dir / "config.toml").is_file():
            raise ValueError(f"{run_dir} has no config.toml; pass a run folder (runs/<name>/<time>)")
        if not (run_dir / "checkpoint.json").is_file():
            raise ValueError(f"{run_dir} has no checkpoint.json: it saved no round, start it anew")
        cfg = RunConfig.load(run_dir / "config.toml")
        check_config(cfg)
        summary = simulate(cfg, resume_dir=run_dir, ray_address=args.ray_address)
    else:
        cfg = _load_config(args.config, args.set)
        check_config(cfg)  # a bad algorithm, aggregator or option fails here, before Ray starts
        summary = simulate(cfg, ray_address=args.ray_address)
    print(json.dumps(summary))
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """Write each client's partition to its own file, for nodes deployed with ``data-path``."""
    from fedtune.experiment import build_federated_data

    cfg = _load_config(args.config, args.set)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; pick a new folder for the partition files")
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(build_federated_data(cfg).train_partitions):
        path = out / f"client-{i}.jsonl"
        part.to_json(str(path), lines=True)
        print(f"partition-id={i}  {len(part)} examples  data-path={json.dumps(str(path))}")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from fedtune.asset_report import format_report, prepare_assets

    t0 = time.perf_counter()
    infos = prepare_assets()
    print(format_report(infos))
    print(f"prepared and verified {len(infos)} assets in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_zo_check(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config, args.set)
    from fedtune.assets.models import load_causal_lm
    from fedtune.zo import ParamSelection, zo_check_report

    model = load_causal_lm(cfg.model.name, num_layers=cfg.model.num_layers or None)
    report = zo_check_report(
        model,
        ParamSelection(mode=cfg.zo.tune),  # type: ignore[arg-type]
        run_seed=cfg.run.seed,
        kind=cfg.zo.perturbation,  # type: ignore[arg-type]
        seed_index=args.seed_index,
    )
    print(json.dumps(report, sort_keys=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.export import export_run

    out = export_run(Path(args.run_dir), Path(args.out_dir))
    print(f"wrote a Hugging Face checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune", description="Federated fine-tuning of language models on Flower."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "simulate", help="run a federated simulation (Flower + Ray) on this machine or a Ray cluster"
    )
    p.add_argument(
        "config", nargs="?", help="TOML config (default: built-in defaults = simulations/default.toml)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. zo.lr=1e-6"
    )
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint (same config)"
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="run the clients on an existing Ray cluster: HEAD:6379, ray://HEAD:10001 or auto "
        "(default: $RAY_ADDRESS, else a private Ray instance on this machine)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "partition", help="write each client's partition to OUT/client-<i>.jsonl (a node's data-path)"
    )
    p.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="an empty or new folder")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("assets", help="prepare and verify the offline model, encoder and datasets")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser(
        "zo-check", help="print the ZO fingerprint and a z checksum as JSON, to compare with the server"
    )
    p.add_argument("--config", help="TOML config whose model/zo/run keys to use")
    p.add_argument("--model", help="model name or folder (overrides the config)")
    p.add_argument("--seed-index", type=int, default=0, help="seed index whose z checksum to print")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_zo_check)

    p = sub.add_parser(
        "export", help="write a run's tuned model (Hugging Face checkpoint, or a peft adapter for LoRA)"
    )
    p.add_argument("run_dir", help="a run folder (holds config.toml and checkpoint.json)")
    p.add_argument("out_dir", help="where to write the model folder")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None):
        args.set = [*args.set, f"model.name={json.dumps(args.model)}"]
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:  # bad config, value or path: a message, not a traceback
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
