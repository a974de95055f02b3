"""``fedtune simulate --ray-address``: the address check, what reaches ``ray.init``, and a real run on a
``ray start --head`` cluster the test starts (and stops) itself.

The cluster gets its own temp dir and ports, so no other Ray instance on the machine sees it, and it is
stopped by signalling the ``ray start --block`` process it started (never ``ray stop``, which stops
every Ray instance on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flwr.simulation
import pytest

from fedtune.config import RunConfig
from fedtune.flower.sim import resolve_ray_address, run_apps

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the address check -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:6379", "head-node.lab:6379", "auto", "local", "ray://10.0.0.5:10001", "[::1]:6379"],
)
def test_valid_addresses_pass_unchanged(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_ray_address(address) == address


@pytest.mark.parametrize(
    "address", ["head", "head:", ":6379", "head:70000", "http://head:8265", "head:6379/x", "a b:1", ""]
)
def test_bad_address_names_the_accepted_forms(address: str) -> None:
    with pytest.raises(ValueError, match=r"--ray-address .* is not a Ray cluster address; pass HEAD:6379"):
        resolve_ray_address(address)


def test_ray_address_env_is_the_fallback_and_the_option_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_ray_address(None) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_ray_address(None) == "10.0.0.5:6379"
    assert resolve_ray_address("local") == "local"  # a private instance even with RAY_ADDRESS set
    assert resolve_ray_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "nonsense")
    with pytest.raises(ValueError, match="RAY_ADDRESS 'nonsense'"):
        resolve_ray_address(None)


@pytest.fixture
def backend_configs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replaces ``flwr.simulation.run_simulation``; collects the backend configs it would get."""
    seen: list[dict[str, Any]] = []

    def fake_run_simulation(**kwargs: Any) -> None:
        seen.append(kwargs["backend_config"])

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return seen


@pytest.fixture
def listening() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a socket that accepts connections (stands in for a Ray head)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_attached_init_args_carry_the_address_and_no_num_cpus(
    backend_configs: list[dict[str, Any]], listening: str
) -> None:
    run_apps(None, None, num_supernodes=2, client_cpus=1, ray_address=listening)
    (cfg,) = backend_configs
    assert cfg["init_args"]["address"] == listening
    assert "num_cpus" not in cfg["init_args"]  # Ray refuses num_cpus when connecting to a cluster
    assert cfg["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}


def test_local_init_args_start_a_private_instance(
    backend_configs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_apps(None, None, num_supernodes=2, client_cpus=4)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    run_apps(None, None, num_supernodes=2, client_cpus=4, ray_address="local")
    for cfg in backend_configs:
        # "local", not None: Ray would otherwise attach to a `ray start` cluster found on this machine
        assert cfg["init_args"]["address"] == "local"
        assert cfg["init_args"]["num_cpus"] >= 4


def test_dead_address_fails_fast_naming_ray_start(backend_configs: list[dict[str, Any]]) -> None:
    # without the check, Ray's driver retries a dead GCS address forever and the process never exits
    dead = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ValueError, match=r"no Ray cluster answers at .*`ray start --head --port="):
        run_apps(None, None, num_supernodes=2, ray_address=dead)
    assert not backend_configs


def test_cli_bad_address_fails_before_ray(
    capsys: pytest.CaptureFixture[str], backend_configs: list[dict[str, Any]], run_cfg: Any, tmp_path: Path
) -> None:
    from fedtune.cli import main

    config = tmp_path / "c.toml"
    config.write_text(run_cfg().to_toml())
    assert main(["simulate", str(config), "--ray-address", "http://head:8265"]) == 2
    assert "is not a Ray cluster address" in capsys.readouterr().err and not backend_configs


def test_cli_passes_the_address_to_simulate(
    monkeypatch: pytest.MonkeyPatch, run_cfg: Any, tmp_path: Path
) -> None:
    import fedtune.flower.sim
    from fedtune.cli import main

    seen: list[str | None] = []

    def fake_simulate(
        cfg: RunConfig, *, resume_dir: Path | None = None, ray_address: str | None = None
    ) -> Any:
        seen.append(ray_address)
        return {}

    monkeypatch.setattr(fedtune.flower.sim, "simulate", fake_simulate)
    config = tmp_path / "c.toml"
    config.write_text(run_cfg().to_toml())
    assert main(["simulate", str(config), "--ray-address", "head:6379"]) == 0
    assert main(["simulate", str(config)]) == 0
    assert seen == ["head:6379", None]  # simulate checks it (the tests above)


# -- a real cluster --------------------------------------------------------------------------------
def _cluster_up(address: str, env: dict[str, str]) -> bool:
    done = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, timeout=60)
    return done.returncode == 0


@pytest.fixture
def ray_head() -> Iterator[tuple[str, dict[str, str], Path]]:
    """A 2-CPU ``ray start --head`` cluster on free ports; yields its address, the env to reach it and
    its temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="fedtune-ray-")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    ports = {"--port": port, "--ray-client-server-port": _free_port(), "--dashboard-port": _free_port()}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=false"]
        + [f"{flag}={value}" for flag, value in ports.items()]
        + [f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the teardown signals only what it started
    )
    try:
        deadline = time.monotonic() + 90
        while not _cluster_up(address, env):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up at {address} (exit code {head.poll()})")
            time.sleep(1)
        yield address, env, Path(temp_dir)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own Ray processes on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # anything of that group still alive
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.third_party_rng
def test_simulation_on_a_ray_cluster_completes_and_leaves_it_running(
    ray_head: tuple[str, dict[str, str], Path], run_cfg: Any
) -> None:
    import ray

    from fedtune.flower.sim import simulate

    address, env, temp_dir = ray_head
    cfg: RunConfig = run_cfg(
        **{"federation.num-clients": 2, "federation.clients-per-round": 2, "federation.num-rounds": 1}
    )
    summary = simulate(cfg, ray_address=address)
    assert summary["completed_rounds"] == 1
    rows = [json.loads(x) for x in (Path(str(summary["run_dir"])) / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert list(temp_dir.glob("session_*/logs/worker-*")), "no Ray worker ran on the cluster"
    assert not ray.is_initialized()  # Flower's ray.shutdown() disconnected this driver ...
    assert _cluster_up(address, env)  # ... and the cluster is still up
