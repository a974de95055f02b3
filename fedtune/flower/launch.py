"""``flwr run`` made honest: run the app through Flower's CLI and report how the run really ended.

``flwr run . --stream`` exits 0 even when the run failed, and the local SuperLink it starts is
detached and outlives the command. :func:`flwr_run` wraps the CLI for scripts and CI:

* a fresh ``FLWR_HOME`` (unless one is given), runtime dependency installation off, telemetry off;
* its own free ports for the local SuperLink (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` /
  ``FLWR_LOCAL_CONTROL_API_PORT``), so it neither reuses nor collides with a SuperLink someone
  else started on the default 39091/39093;
* ``--run-config`` from a TOML file plus ``overrides`` (Flower refuses a file together with
  ``k=v`` pairs, so both are merged into one temporary TOML file first);
* ``--federation-config "num-supernodes=N client-resources-num-cpus=... ..."``;
* the final status from ``flwr list local --run-id <id> --format json``;
* the SuperLink it started (and anything else left running under its ``FLWR_HOME``) stopped.

``python -m fedtune.flower.launch [--config FILE] [--num-supernodes N] [--set k=v ...]`` does the
same from a shell and exits non-zero unless the run completed; its last line is the status JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig, Scalar, flatten, parse_overrides, toml_value

COMPLETED = "finished:completed"
CONNECTION = "local"  # the default ``:local:`` connection a fresh FLWR_HOME/config.toml gets
TAIL_CHARS = 12_000
_RUN_ID = re.compile(r"Successfully started run (\d+)")


@dataclass(frozen=True)
class FlwrRunResult:
    """How a ``flwr run`` ended, as the SuperLink recorded it (not the CLI's exit code)."""

    status: str  # "finished:completed" | "finished:failed" | "finished:stopped" | "running" | ...
    run_id: int | None
    returncode: int | None  # the ``flwr run`` process's exit code (None: killed on timeout)
    output_tail: str
    wall_s: float
    flwr_home: Path
    run_info: dict[str, Any] = field(default_factory=dict)  # the run's row from ``flwr list``

    @property
    def ok(self) -> bool:
        """True only for a run the SuperLink recorded as completed."""
        return self.status == COMPLETED

    def to_json(self) -> str:
        return json.dumps(
            {
                "ok": self.ok,
                "status": self.status,
                "run-id": None if self.run_id is None else str(self.run_id),
                "returncode": self.returncode,
                "wall-s": round(self.wall_s, 1),
                "flwr-home": str(self.flwr_home),
                "status-details": self.run_info.get("status-details"),
            }
        )


def flwr_run(
    app_dir: Path,
    *,
    run_config: Path | None,
    overrides: Mapping[str, Scalar],
    num_supernodes: int,
    flwr_home: Path | None = None,
    timeout_s: float,
    echo: bool = False,
) -> FlwrRunResult:
    """Run ``flwr run <app_dir> local --stream`` on a private local SuperLink and wait for the end.

    ``run_config``: a TOML file (tables per section, like ``simulations/*.toml``); ``overrides``:
    dotted keys on top of it (``{"zo.lr": 1e-6}``). Every key must exist in the app's
    ``[tool.flwr.app.config]`` (Flower refuses others). ``num_supernodes``: simulated SuperNodes
    (one per ``federation.num-clients`` partition). ``flwr_home``: the Flower home to use (a fresh
    temporary one, removed after a completed run, when None). ``timeout_s``: wall-clock limit;
    a run still going then is stopped and reported with its last status. ``echo``: copy the CLI
    output to stdout as it comes.
    """
    if num_supernodes < 1:
        raise ValueError("num_supernodes must be >= 1")
    app_dir = Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise ValueError(f"{app_dir} has no pyproject.toml; pass the Flower app folder (the repo root)")
    flat = _merged_run_config(run_config, overrides)
    _check_known_keys(app_dir, flat)
    own_home = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fedtune-flwr-home-")) if flwr_home is None else Path(flwr_home)
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = _environment(home)
    start = time.monotonic()
    before = _processes_under(home)
    try:
        federation = ["--federation-config", _federation_config(app_dir, flat, num_supernodes)]
        status, run_id, returncode, output, info = run_app(
            app_dir, CONNECTION, flat, env=env, extra_args=federation, timeout_s=timeout_s, echo=echo
        )
    finally:
        _stop_processes(_processes_under(home) - before)
    wall = time.monotonic() - start
    result = FlwrRunResult(status, run_id, returncode, output[-TAIL_CHARS:], wall, home, info)
    if own_home and result.ok:
        shutil.rmtree(home, ignore_errors=True)
    return result


def run_app(
    app_dir: Path,
    connection: str,
    flat: Mapping[str, Scalar],
    *,
    env: Mapping[str, str],
    extra_args: Sequence[str] = (),
    timeout_s: float,
    echo: bool = False,
) -> tuple[str, int | None, int | None, str, dict[str, Any]]:
    """``flwr run <app_dir> <connection> --stream``: (final status, run id, exit code, output, run row).

    The status is the SuperLink's (``flwr list --format json``), not the CLI's exit code; a run
    still going at ``timeout_s`` is stopped and reported as ``timeout:<status>``.
    """
    flwr = _flwr_executable()
    run_id: int | None = None
    status, info = "not-started", dict[str, Any]()
    with tempfile.TemporaryDirectory(prefix="fedtune-run-config-") as tmp:
        cmd = [flwr, "run", str(app_dir), connection, "--stream"]
        if flat:
            path = Path(tmp) / "run-config.toml"
            path.write_text(_dotted_toml(flat), encoding="utf-8")
            cmd += ["--run-config", str(path)]
        returncode, output = _stream(
            [*cmd, *extra_args], env=env, cwd=app_dir, timeout_s=timeout_s, echo=echo
        )
    run_id = _run_id(output)
    if run_id is None and returncode in (0, None):  # started, but the line was not seen
        run_id = _latest_run_id(flwr, env, app_dir, connection)
    if run_id is not None:
        status, info = _final_status(
            flwr, env, app_dir, run_id, running=returncode is None, connection=connection
        )
        if returncode is None and not status.startswith("finished"):
            _call(flwr, ["stop", str(run_id), connection], env, app_dir)
            status, info = _final_status(flwr, env, app_dir, run_id, running=False, connection=connection)
            status = status if status.startswith("finished") else f"timeout:{status}"
    return status, run_id, returncode, output, info


# -- building the command ---------------------------------------------------------------------------
def _merged_run_config(run_config: Path | None, overrides: Mapping[str, Scalar]) -> dict[str, Scalar]:
    flat: dict[str, Any] = {}
    if run_config is not None:
        path = Path(run_config)
        if not path.is_file():
            raise ValueError(
                f"run config {path} does not exist; pass a TOML file such as simulations/default.toml"
            )
        flat.update(flatten(tomllib.loads(path.read_text(encoding="utf-8"))))
    flat.update(overrides)
    for key, value in flat.items():
        if not isinstance(value, bool | int | float | str):
            raise ValueError(
                f"run config {key} must be a bool, int, float or string, got {type(value).__name__}"
            )
    return flat


def _check_known_keys(app_dir: Path, flat: Mapping[str, Scalar]) -> None:
    """Flower refuses a run whose config has a key its pyproject defaults lack ("[code: 15] Invalid
    run configuration", nothing more); say which key, before starting anything."""
    known = _app_defaults(app_dir)
    unknown = sorted(k for k in flat if k not in known)
    if unknown:
        hint = (
            " The [aggregator.options] and [algorithm.options] tables are empty in pyproject.toml, so "
            "Flower's CLI cannot set their keys; use `fedtune simulate` for runs that need them."
            if any(".options." in k for k in unknown)
            else ""
        )
        raise ValueError(
            f"flwr run accepts only keys of [tool.flwr.app.config] in {app_dir / 'pyproject.toml'}; "
            f"not there: {', '.join(unknown)}.{hint}"
        )


def _dotted_toml(flat: Mapping[str, Scalar]) -> str:
    """``{"zo.lr": 1e-6}`` -> ``"zo"."lr" = 1e-06``: Flower reads it back as the same dotted key."""
    lines = []
    for key, value in flat.items():
        dotted = ".".join(json.dumps(part) for part in key.split("."))
        lines.append(f"{dotted} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def _federation_config(app_dir: Path, flat: Mapping[str, Scalar], num_supernodes: int) -> str:
    """Simulation size and Ray resources, taken from the effective ``[federation]`` section."""
    try:
        fed = RunConfig.from_flat({**_app_defaults(app_dir), **flat}).federation
    except ValueError:
        fed = RunConfig().federation  # the run itself then fails and reports the bad key
    cpus, gpus = fed.client_cpus, fed.client_gpus
    # Ray must offer at least one client's CPUs, or no ClientApp is ever scheduled.
    ray_cpus = max(cpus, os.cpu_count() or 1)
    return (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus} "
        f"client-resources-num-gpus={gpus!r} init-args-num-cpus={ray_cpus}"
    )


def _app_defaults(app_dir: Path) -> dict[str, Any]:
    data = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    return flatten(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def _environment(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    http_port, control_port = _free_ports(2)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": env.get("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
        }
    )
    return env


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _flwr_executable() -> str:
    sibling = Path(sys.executable).with_name("flwr")
    found = str(sibling) if sibling.is_file() else shutil.which("flwr")
    if not found:
        raise RuntimeError("the `flwr` command is not installed; pip install 'flwr[simulation]>=1.42,<1.43'")
    return found


# -- running and reading back -----------------------------------------------------------------------
def _stream(
    cmd: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout_s: float, echo: bool
) -> tuple[int | None, str]:
    """Run ``cmd``, collecting stdout+stderr; (exit code or None on timeout, output)."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        shown = 0
        returncode: int | None = None
        while True:
            try:
                returncode = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                returncode = None
            if echo:
                sink.seek(shown)
                chunk = sink.read()
                shown += len(chunk)
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
                sink.seek(0, os.SEEK_END)
            if returncode is not None:
                break
            if time.monotonic() > deadline:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                break
        sink.seek(0)
        return returncode, sink.read().decode("utf-8", "replace")


def _call(flwr: str, args: Sequence[str], env: Mapping[str, str], cwd: Path) -> str:
    try:
        done = subprocess.run(
            [flwr, *args], env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout


def _list_runs(
    flwr: str, env: Mapping[str, str], cwd: Path, run_id: int | None = None, connection: str = CONNECTION
) -> list[dict[str, Any]]:
    args = ["list", connection, "--format", "json"]
    if run_id is not None:
        args[2:2] = ["--run-id", str(run_id)]
    text = _call(flwr, args, env, cwd)
    start = text.find("{")
    if start < 0:
        return []
    try:
        data = json.loads(text[start:])
    except json.JSONDecodeError:
        return []
    runs = data.get("runs") if isinstance(data, dict) else None
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _run_id(output: str) -> int | None:
    found = _RUN_ID.findall(output)
    return int(found[-1]) if found else None


def _latest_run_id(flwr: str, env: Mapping[str, str], cwd: Path, connection: str = CONNECTION) -> int | None:
    runs = _list_runs(flwr, env, cwd, connection=connection)
    runs.sort(key=lambda r: str(r.get("pending-at", "")))
    return int(runs[-1]["run-id"]) if runs and str(runs[-1].get("run-id", "")).isdigit() else None


def _final_status(
    flwr: str, env: Mapping[str, str], cwd: Path, run_id: int, *, running: bool, connection: str = CONNECTION
) -> tuple[str, dict[str, Any]]:
    """The run's status; waits briefly for "finished:*" (the stream may end just before it)."""
    deadline = time.monotonic() + (0.0 if running else 30.0)
    while True:
        runs = _list_runs(flwr, env, cwd, run_id, connection)
        rows = [r for r in runs if str(r.get("run-id")) == str(run_id)]
        info = rows[0] if rows else {}
        status = str(info.get("status", "unknown"))
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, info
        time.sleep(1.0)


# -- cleaning up ------------------------------------------------------------------------------------
def _processes_under(home: Path) -> set[int]:
    """PIDs of this user's processes whose environment has ``FLWR_HOME=<home>`` (Linux /proc).

    The SuperLink, its SuperExec, the simulation process and Ray all inherit the environment the
    CLI started them with, so this finds exactly what a launch with that Flower home left behind.
    """
    needle = f"FLWR_HOME={home}".encode()
    me = os.getpid()
    found: set[int] = set()
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.add(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _stop_processes(pids: set[int], grace_s: float = 10.0) -> None:
    """SIGTERM the SuperLink(s) first (they stop their SuperExec), then whatever is left, then SIGKILL."""
    superlinks = {p for p in pids if "flower-superlink" in _cmdline(p)}
    for group in (superlinks, pids):
        alive = {p for p in group if _signal(p, signal.SIGTERM)}
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = {p for p in alive if _alive(p)}
        for pid in alive:
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- command line -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedtune.flower.launch",
        description="Run the app with `flwr run` on a private local SuperLink; exit 1 unless it completed.",
    )
    parser.add_argument("--app-dir", default=".", help="the Flower app folder (default: .)")
    parser.add_argument("--config", help="run config TOML, e.g. simulations/default.toml")
    parser.add_argument(
        "--num-supernodes", type=int, help="simulated SuperNodes (default: federation.num-clients)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--flwr-home", help="Flower home (default: a fresh temporary folder)")
    parser.add_argument("--timeout-s", type=float, default=24 * 3600.0)
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    app_dir = Path(args.app_dir)
    config = Path(args.config) if args.config else None
    try:
        num = args.num_supernodes
        if num is None:
            effective = {**_app_defaults(app_dir.resolve()), **_merged_run_config(config, overrides)}
            num = int(effective.get("federation.num-clients", RunConfig().federation.num_clients))
        result = flwr_run(
            app_dir,
            run_config=config,
            overrides=overrides,
            num_supernodes=num,
            flwr_home=Path(args.flwr_home) if args.flwr_home else None,
            timeout_s=args.timeout_s,
            echo=True,
        )
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"ok": False, "status": "not-started", "run-id": None, "error": str(exc)}))
        return 2
    if not result.ok:
        print(
            f"\nflwr run did not complete: status {result.status} (the ServerApp log is above; the "
            f"SuperLink's own log is {result.flwr_home}/local-superlink/superlink.log)",
            file=sys.stderr,
        )
    print(result.to_json())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
