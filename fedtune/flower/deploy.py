"""A real Flower deployment on one machine: a SuperLink with TLS and SuperNode authentication, and
SuperNodes with their own data, keys, ports and Flower homes, as separate hosts would have them.

Used by the integration tests, ``scripts/deploy/loopback.py`` and ``benchmarks/deploy_overhead.py``;
``docs/deployment.md`` gives the same commands for separate hosts. Everything is Flower's own
executables (``flower-superlink``, ``flower-supernode``, ``flwr``), started as subprocesses:

* the SuperLink gets the test CA's server certificate, ``--enable-supernode-auth`` and
  ``--disable-runtime-dependency-installation``;
* each SuperNode key is created with :func:`fedtune.wire.tls.write_supernode_key` and registered
  with ``flwr supernode register`` before the node starts (an unregistered node is refused);
* a node's ``--node-config`` carries its ``partition-id``, its ``data-path`` and its ``state-dir``;
* a run's result is the SuperLink's final status (``flwr list --format json``), never the CLI's
  exit code, which is 0 even for a failed run.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fedtune.config import Scalar, toml_value
from fedtune.flower.launch import (
    COMPLETED,
    _check_known_keys,
    _environment,
    _flwr_executable,
    _free_ports,
    _processes_under,
    _signal,
    _stop_processes,
    run_app,
)
from fedtune.wire.tls import NodeKeyFiles, TLSFiles, write_supernode_key, write_test_pki

CONNECTION = "fedtune-deploy"
_REGISTERED = re.compile(r"SuperNode (\d+) registered")


@dataclass(frozen=True)
class DeployedRun:
    """How a ``flwr run`` on the deployment ended, as the SuperLink recorded it."""

    status: str
    run_id: int | None
    wall_s: float
    output_tail: str
    run_info: Mapping[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


@dataclass
class SuperNode:
    """One started SuperNode process and what it was given."""

    index: int
    node_config: Mapping[str, Scalar]
    key: NodeKeyFiles | None
    home: Path
    process: subprocess.Popen[bytes]
    log: Path
    node_id: int | None  # the SuperLink's id for its key, once registered

    def wait_exit(self, timeout_s: float) -> int | None:
        """Its exit code, or None if it is still running after ``timeout_s``."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None


def node_config_arg(values: Mapping[str, Scalar]) -> str:
    """``--node-config`` text: space-separated TOML ``key=value`` pairs (strings quoted)."""
    for key in values:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
            raise ValueError(f"node config key {key!r}: use kebab-case letters, digits and '-'")
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


class LoopbackDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, TLS and node authentication on; a context manager.

    ``work_dir`` receives certs/, keys/, one Flower home per process and logs/; everything this
    deployment started is stopped on exit (SuperNodes, then the SuperLink and its SuperExec).
    """

    def __init__(self, work_dir: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.home = self.work_dir / "flwr-home"  # the SuperLink's and the CLI's
        self.home.mkdir(exist_ok=True)
        self.certs: TLSFiles = write_test_pki(self.work_dir / "certs", ("localhost", "127.0.0.1"))
        self.port = _free_ports(1)[0]
        self.env = {**_environment(self.home), **(env or {})}
        self.nodes: list[SuperNode] = []
        self._superlink: subprocess.Popen[bytes] | None = None
        self._ids: dict[Path, int] = {}
        self._homes: list[Path] = [self.home]
        self._write_cli_config()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> LoopbackDeployment:
        self.start_superlink()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start_superlink(self, timeout_s: float = 60.0) -> None:
        cmd = [
            _sibling("flower-superlink"),
            "--ssl-ca-certfile", str(self.certs.ca_cert),
            "--ssl-certfile", str(self.certs.server_cert),
            "--ssl-keyfile", str(self.certs.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--database", str(self.work_dir / "superlink.db"),
        ]  # fmt: skip
        self._superlink = self._spawn(cmd, self.env, self.logs / "superlink.log")
        deadline = time.monotonic() + timeout_s
        while not _listening(self.port):
            if self._superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited ({self._superlink.returncode}); see {self.logs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the SuperLink did not listen on {self.address} within {timeout_s:.0f} s")
            time.sleep(0.2)

    def close(self) -> None:
        for node in self.nodes:
            _terminate(node.process)
        if self._superlink is not None:
            _terminate(self._superlink)
        leftovers: set[int] = set()
        for home in self._homes:
            leftovers |= _processes_under(home)
        _stop_processes(leftovers, grace_s=5.0)

    # -- nodes ------------------------------------------------------------------------------------
    def new_key(self, name: str) -> NodeKeyFiles:
        return write_supernode_key(self.work_dir / "keys" / name)

    def register(self, key: NodeKeyFiles) -> int:
        """``flwr supernode register``: the SuperLink's node id for this public key."""
        out = self._flwr(["supernode", "register", str(key.public), CONNECTION])
        found = _REGISTERED.search(out)
        if not found:
            raise RuntimeError(f"flwr supernode register did not register {key.public}: {out.strip()[-500:]}")
        self._ids[key.public] = int(found.group(1))
        return self._ids[key.public]

    def start_supernode(
        self,
        node_config: Mapping[str, Scalar],
        *,
        key: NodeKeyFiles | None,
        with_ca: bool = True,
        index: int | None = None,
    ) -> SuperNode:
        """Start a SuperNode (its own Flower home and ClientAppIo port); ``index`` restarts node ``index``."""
        i = len(self.nodes) if index is None else index
        home = self.work_dir / f"node-{i}" / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        if home not in self._homes:
            self._homes.append(home)
        cmd = [
            _sibling("flower-supernode"),
            "--superlink", self.address,
            "--port", str(_free_ports(1)[0]),
            "--node-config", node_config_arg(node_config),
            "--max-retries", "0",
        ]  # fmt: skip
        if with_ca:
            cmd += ["--root-certificates", str(self.certs.ca_cert)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key.private)]
        env = {**self.env, "FLWR_HOME": str(home)}
        log = self.logs / f"supernode-{i}-{int(time.time() * 1000)}.log"
        node_id = None if key is None else self._ids.get(key.public)
        node = SuperNode(i, dict(node_config), key, home, self._spawn(cmd, env, log), log, node_id)
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes[index] = node
        return node

    def kill_supernode(self, index: int) -> None:
        """SIGKILL a SuperNode and the ClientApp it runs: a device that loses power mid-round."""
        node = self.nodes[index]
        for pid in _processes_under(node.home):
            _signal(pid, signal.SIGKILL)
        node.process.wait(timeout=30)

    def wait_offline(self, index: int, timeout_s: float = 180.0) -> bool:
        """Wait until the SuperLink no longer lists node ``index`` as online.

        A killed node stays "online" until it misses two heartbeats (Flower sends one every 30 s),
        and the SuperLink refuses to activate a key that is online, so a restart must wait.
        """
        node_id = self.nodes[index].node_id
        deadline = time.monotonic() + timeout_s
        while node_id in self.online_nodes():
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
        return True

    def online_nodes(self) -> list[int]:
        """Node ids the SuperLink lists as online (``flwr supernode ls --format json``)."""
        text = self._flwr(["supernode", "ls", CONNECTION, "--format", "json"])
        start = text.find("{")
        try:
            data = json.loads(text[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            return []
        rows = data.get("nodes", []) if isinstance(data, dict) else []
        return sorted(
            int(r["node-id"]) for r in rows if isinstance(r, dict) and str(r.get("status")) == "online"
        )

    # -- runs -------------------------------------------------------------------------------------
    def run(
        self, app_dir: Path, overrides: Mapping[str, Scalar], *, timeout_s: float, echo: bool = False
    ) -> DeployedRun:
        """``flwr run <app_dir> fedtune-deploy --stream`` with ``overrides`` as the run config."""
        app_dir = Path(app_dir).resolve()
        _check_known_keys(app_dir, overrides)
        start = time.monotonic()
        status, run_id, _, output, info = run_app(
            app_dir, CONNECTION, overrides, env=self.env, timeout_s=timeout_s, echo=echo
        )
        return DeployedRun(status, run_id, time.monotonic() - start, output[-12_000:], info)

    # -- helpers ----------------------------------------------------------------------------------
    def _write_cli_config(self) -> None:
        (self.home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{self.address}"\n'
            f"root-certificates = {json.dumps(str(self.certs.ca_cert))}\n",
            encoding="utf-8",
        )

    def _flwr(self, args: list[str]) -> str:
        done = subprocess.run(
            [_flwr_executable(), *args],
            env=self.env,
            cwd=self.work_dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done.stdout + done.stderr

    def _spawn(self, cmd: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as sink:
            return subprocess.Popen(
                cmd, env=dict(env), cwd=self.work_dir, stdout=sink, stderr=subprocess.STDOUT
            )


def _sibling(name: str) -> str:
    """A console script of this environment (next to ``flwr``)."""
    path = Path(_flwr_executable()).with_name(name)
    found = str(path) if path.is_file() else shutil.which(name)
    if not found:
        raise RuntimeError(f"`{name}` is not installed; pip install 'flwr[simulation]>=1.42,<1.43'")
    return found


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _terminate(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
