"""A whole deployment on loopback, end to end: TLS, registered SuperNodes with their own data files,
``flwr run``, the SuperLink's final status, and optionally a SuperNode killed mid-round and restarted.

``python -m fedtune.flower.loopback WORK_DIR [--rounds N] [--kill-node I --kill-round R] [--set k=v]``
prints one JSON object (the status, the server's rounds, each node's per-round phases) and exits
non-zero unless the run completed. The integration tests and ``benchmarks/deploy_overhead.py`` use
:func:`run_loopback`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig, Scalar, parse_overrides
from fedtune.flower.deploy import DeployedRun, LoopbackDeployment
from fedtune.flower.launch import _cmdline, _processes_under
from fedtune.runlog import read_jsonl
from fedtune.runtime.node import ROUNDS_FILE

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class KillPlan:
    """Kill SuperNode ``node`` while it runs round ``server_round``; restart it ``restart_after_s`` after
    the SuperLink has marked it offline."""

    node: int
    server_round: int
    restart_after_s: float = 1.0

    def __post_init__(self) -> None:
        if self.node < 0 or self.server_round < 1 or self.restart_after_s < 0:
            raise ValueError("kill plan: node >= 0, server_round >= 1 and restart_after_s >= 0")


@dataclass(frozen=True)
class LoopbackReport:
    """What a loopback run produced: the SuperLink's verdict and both sides' per-round records."""

    run: DeployedRun
    server_rounds: list[dict[str, Any]]
    node_rounds: dict[int, list[dict[str, Any]]]
    killed_at_s: float | None = None
    events: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.run.ok,
            "status": self.run.status,
            "run_id": self.run.run_id,
            "wall_s": round(self.run.wall_s, 2),
            "server_rounds": self.server_rounds,
            "node_rounds": {str(k): v for k, v in self.node_rounds.items()},
            "events": self.events,
        }


def write_node_files(cfg: RunConfig, out_dir: Path, num_nodes: int) -> list[Path]:
    """Split the configured task into one local jsonl file per node (its private data on its host)."""
    from fedtune.experiment import build_federated_data_from

    parts = build_federated_data_from(cfg.data, num_nodes, cfg.run.seed).train_partitions
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(parts):
        path = out_dir / f"node-{i}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for row in part.select_columns(["prompt", "answer", "label"]):
                fh.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


def run_loopback(
    work_dir: Path,
    overrides: Mapping[str, Scalar],
    *,
    num_nodes: int = 2,
    kill: KillPlan | None = None,
    timeout_s: float = 600.0,
    app_dir: Path = REPO,
    echo: bool = False,
    env: Mapping[str, str] | None = None,
) -> LoopbackReport:
    """Start a TLS + authenticated deployment of ``num_nodes`` SuperNodes, run the app, stop it all.

    ``env``: extra environment for every process (e.g. ``OMP_NUM_THREADS=1``, so nodes sharing one
    machine do not fight over its cores as separate devices would not).
    """
    work_dir = Path(work_dir).resolve()
    flat: dict[str, Scalar] = {"run.output-dir": str(work_dir / "runs"), **overrides}
    cfg = RunConfig.from_flat(flat)
    files = write_node_files(cfg, work_dir / "data", num_nodes)
    events: list[str] = []
    with LoopbackDeployment(work_dir, env=env) as dep:
        configs: list[dict[str, Scalar]] = []
        for i, path in enumerate(files):
            key = dep.new_key(f"supernode_{i}")
            dep.register(key)
            node_cfg: dict[str, Scalar] = {
                "partition-id": i,
                "data-path": str(path),
                "state-dir": str(work_dir / f"node-{i}" / "state"),
            }
            configs.append(node_cfg)
            dep.start_supernode(node_cfg, key=key)
        watcher = None
        if kill is not None:
            watcher = threading.Thread(
                target=_kill_and_restart, args=(dep, kill, configs, events, timeout_s), daemon=True
            )
            watcher.start()
        run = dep.run(app_dir, flat, timeout_s=timeout_s, echo=echo)
        if watcher is not None:
            watcher.join(timeout=5)
    return LoopbackReport(
        run=run,
        server_rounds=_server_rounds(Path(cfg.run.output_dir) / cfg.run.name),
        node_rounds={i: _node_rounds(Path(str(c["state-dir"]))) for i, c in enumerate(configs)},
        events=events,
    )


def _kill_and_restart(
    dep: LoopbackDeployment,
    plan: KillPlan,
    configs: Sequence[Mapping[str, Scalar]],
    events: list[str],
    timeout_s: float,
) -> None:
    """Wait until the node has served the round before and runs a ClientApp again, then kill it."""
    node = dep.nodes[plan.node]
    state = Path(str(configs[plan.node]["state-dir"]))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = _node_rounds(state)
        served, done_pids = {int(r["round"]) for r in rows}, {int(r["pid"]) for r in rows}
        # A ClientApp that is not one of the finished rounds' (those linger to send their reply).
        busy = any(
            "flwr-clientapp" in _cmdline(pid) and pid not in done_pids for pid in _processes_under(node.home)
        )
        if (plan.server_round == 1 or plan.server_round - 1 in served) and busy:
            dep.kill_supernode(plan.node)
            events.append(f"killed node {plan.node} in round {plan.server_round} at {time.time():.1f}")
            if not dep.wait_offline(plan.node):
                events.append(f"node {plan.node} stayed online on the SuperLink; not restarted")
                return
            time.sleep(plan.restart_after_s)
            dep.start_supernode(configs[plan.node], key=node.key, index=plan.node)
            events.append(f"restarted node {plan.node} at {time.time():.1f}")
            return
        time.sleep(0.1)
    events.append(f"node {plan.node} never reached round {plan.server_round}")


def _node_rounds(state_dir: Path) -> list[dict[str, Any]]:
    return [r for path in sorted(state_dir.glob(f"*/client-*/{ROUNDS_FILE}")) for r in read_jsonl(path)]


def _server_rounds(runs: Path) -> list[dict[str, Any]]:
    found = sorted(runs.glob("*/metrics.jsonl"))
    return [dict(r) for r in read_jsonl(found[-1])] if found else []


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--kill-node", type=int)
    ap.add_argument("--kill-round", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=900.0)
    args = ap.parse_args(argv)
    kill = None if args.kill_node is None else KillPlan(args.kill_node, args.kill_round)
    report = run_loopback(
        args.work_dir, parse_overrides(args.set), num_nodes=args.nodes, kill=kill, timeout_s=args.timeout_s
    )
    print(json.dumps(report.to_json()))
    return 0 if report.run.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
