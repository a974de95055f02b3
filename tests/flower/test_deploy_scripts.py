"""The documented multi-host scripts, run as a user runs them: certificates and keys, the SuperLink,
the CLI connection with registered keys, and a SuperNode that comes online (docs/deployment.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.flower.launch import _free_ports

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "scripts" / "deploy"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def _start(script: str, cwd: Path, env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
    """A deploy script in its own session (so teardown can stop its whole process group)."""
    with (cwd / log).open("wb") as sink:
        return subprocess.Popen(
            ["bash", str(DEPLOY / script)], cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_make_test_certs_writes_the_pki_and_supernode_keys(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "scripts/make_test_certs.py", str(tmp_path / "certs"), "--supernode-keys", "2"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert {p.name for p in (tmp_path / "certs").iterdir()} == {"ca.crt", "server.pem", "server.key"}
    keys = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert keys == ["supernode_0", "supernode_0.pub", "supernode_1", "supernode_1.pub"]
    assert "supernode_1.pub" in out.stdout


@pytest.mark.parametrize(
    ("script", "needs"),
    [("supernode.sh", "SUPERLINK"), ("connect.sh", "SUPERLINK"), ("superlink.sh", "make_test_certs")],
)
def test_scripts_say_what_is_missing(script: str, needs: str, tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(DEPLOY / script)], cwd=tmp_path, env=_env(CERTS=str(tmp_path / "none")),
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert done.returncode != 0 and needs in done.stderr


@pytest.mark.slow
def test_scripts_bring_a_registered_supernode_online(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_test_certs.py"), "certs", "--supernode-keys", "1"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    port, node_port = _free_ports(2)
    home = str(tmp_path / "flwr-home")
    env = _env(FLWR_HOME=home, PORT=str(port), HOST="127.0.0.1", SUPERLINK=f"127.0.0.1:{port}")
    started.append(_start("superlink.sh", tmp_path, env, "superlink.log"))
    deadline = time.monotonic() + 60
    connected = ""
    while time.monotonic() < deadline:
        done = subprocess.run(["bash", str(DEPLOY / "connect.sh")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode == 0:
            connected = done.stdout
            break
        time.sleep(1.0)
    assert "registered" in connected, connected
    data = tmp_path / "node0.jsonl"
    data.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    node_env = {**env, "KEY": "keys/supernode_0", "PARTITION": "0", "DATA": str(data),
                "STATE": str(tmp_path / "state"), "CLIENTAPPIO_PORT": str(node_port)}  # fmt: skip
    started.append(_start("supernode.sh", tmp_path, node_env, "supernode.log"))
    flwr = str(Path(sys.executable).with_name("flwr"))
    status = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and '"online"' not in status:
        time.sleep(1.0)
        status = subprocess.run([flwr, "supernode", "ls", "fedtune-deploy", "--format", "json"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, check=False).stdout  # fmt: skip
    assert '"online"' in status, (status, (tmp_path / "supernode.log").read_text()[-2000:])
