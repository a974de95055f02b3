"""Programmatic simulation on Flower's Ray runtime, behind one swappable function.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.42 and passes an empty run config,
so the whole :class:`RunConfig` travels as overrides baked into both apps. ``flwr run .`` (the
supported path) reads the same keys from ``pyproject.toml`` and ``--run-config``.

Ray: by default each run starts a private Ray instance on this machine; ``ray_address`` (or
``$RAY_ADDRESS``) attaches to an existing cluster instead, whose nodes then host the virtual clients.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig


class _DropDeprecation(logging.Filter):
    """Hide Flower's one "run_simulation is deprecated" notice (the README says why we use it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "run_simulation" not in text and "DEPRECATED FEATURE" not in text


_RAY_ADDRESS = re.compile(
    r"(?:ray://)?(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})"
)
_ADDRESS_FORMS = (
    "HEAD:6379 (the address `ray start --head` prints), ray://HEAD:10001 (Ray Client), "
    "auto (the cluster `ray start` started on this machine) or local (a private Ray instance, the default)"
)


def resolve_ray_address(address: str | None) -> str:
    """The Ray cluster a simulation attaches to: ``address``, else ``$RAY_ADDRESS``, else ``"local"``.

    ``"local"`` means a private Ray instance started (and stopped) by the run; it is passed to Ray as
    such, so a run never attaches by accident to a ``ray start`` cluster found on this machine (Ray
    would then refuse fedtune's ``num_cpus``). Checked here because Ray's own error for a bad address
    comes from Flower's backend thread, after the ServerApp has started.
    """
    source = "--ray-address"
    if address is None:
        address, source = os.environ.get("RAY_ADDRESS", "").strip() or "local", "RAY_ADDRESS"
    text = address.strip()
    if text in ("auto", "local"):
        return text
    match = _RAY_ADDRESS.fullmatch(text)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{source} {address!r} is not a Ray cluster address; pass {_ADDRESS_FORMS}")
    return text


def check_ray_reachable(address: str, *, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a ``host:port`` address: Ray's driver would otherwise retry
    the connection forever in Flower's backend thread, and the process would never exit."""
    match = _RAY_ADDRESS.fullmatch(address)
    if match is None:  # "auto" and "local": Ray finds (or starts) the instance itself
        return
    host, port = match["ip6"] or match["host"], int(match["port"])
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(
            f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head --port={port}` "
            "on that host, or pass the address it printed"
        ) from exc


def ray_init_args(address: str, *, client_cpus: int) -> dict[str, Any]:
    """``ray.init`` arguments for Flower's Ray backend. Attached to a cluster, no ``num_cpus``: Ray
    refuses it there, and the cluster's nodes already declare their resources."""
    args: dict[str, Any] = {"address": address, "logging_level": "ERROR", "log_to_driver": True}
    if address == "local":
        args["num_cpus"] = max(client_cpus, os.cpu_count() or 1)
    return args


def run_apps(
    server_app: Any,
    client_app: Any,
    *,
    num_supernodes: int,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
    ray_address: str | None = None,
) -> None:
    """``run_simulation`` on Ray with fedtune's settings: no telemetry, Flower's log lines once,
    its deprecation notice hidden, Ray's own logging quiet.

    ``ray_address``: see :func:`resolve_ray_address`. At the end Flower kills its actors and calls
    ``ray.shutdown()``, which on an attached cluster only disconnects this driver: the cluster stays up.
    """
    address = resolve_ray_address(ray_address)
    check_ray_reachable(address)
    init_args = ray_init_args(address, client_cpus=client_cpus)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    flwr_log = logging.getLogger("flwr")
    # Flower's logger has its own console handler; a root handler (set by a library during the run)
    # would print every Flower line a second time.
    flwr_log.propagate = False
    drop = _DropDeprecation()
    flwr_log.addFilter(drop)
    for handler in flwr_log.handlers:
        handler.addFilter(drop)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config={
                "client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
                "init_args": init_args,
            },
        )


def simulate(
    cfg: RunConfig, *, resume_dir: Path | None = None, ray_address: str | None = None
) -> dict[str, Any]:
    """Run ``cfg`` with ``federation.num_clients`` virtual SuperNodes; returns the run summary.

    ``resume_dir``: continue that run folder from its checkpoint instead of starting a new one.
    ``ray_address``: an existing Ray cluster to run the clients on (see :func:`resolve_ray_address`).
    """
    from fedtune.flower.apps import build_client_app, build_server_app

    address = resolve_ray_address(ray_address)  # a bad or dead address fails before any app is built
    check_ray_reachable(address)

    flat = cfg.to_flat()
    results: list[dict[str, Any]] = []
    fed = cfg.federation
    run_apps(
        build_server_app(flat, results=results, resume_dir=resume_dir),
        build_client_app(flat),
        num_supernodes=fed.num_clients,
        client_cpus=fed.client_cpus,
        client_gpus=fed.client_gpus,
        ray_address=address,
    )
    if not results:
        raise RuntimeError("the simulation ended without a result; see the log above for the ServerApp error")
    return results[-1]
