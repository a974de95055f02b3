"""Programmatic simulation on Flower's Ray runtime, behind one swappable function.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.42 and passes an empty run config,
so the whole :class:`RunConfig` travels as overrides baked into both apps. ``flwr run .`` (the
supported path) reads the same keys from ``pyproject.toml`` and ``--run-config``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig


class _DropDeprecation(logging.Filter):
    """Hide Flower's one "run_simulation is deprecated" notice (the README says why we use it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "run_simulation" not in text and "DEPRECATED FEATURE" not in text


def run_apps(
    server_app: Any,
    client_app: Any,
    *,
    num_supernodes: int,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
) -> None:
    """``run_simulation`` on Ray with fedtune's settings: no telemetry, Flower's log lines once,
    its deprecation notice hidden, Ray's own logging quiet."""
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
                "init_args": {
                    "num_cpus": max(client_cpus, os.cpu_count() or 1),
                    "logging_level": "ERROR",
                    "log_to_driver": True,
                },
            },
        )


def simulate(cfg: RunConfig, *, resume_dir: Path | None = None) -> dict[str, Any]:
    """Run ``cfg`` with ``federation.num_clients`` virtual SuperNodes; returns the run summary.

    ``resume_dir``: continue that run folder from its checkpoint instead of starting a new one.
    """
    from fedtune.flower.apps import build_client_app, build_server_app

    flat = cfg.to_flat()
    results: list[dict[str, Any]] = []
    fed = cfg.federation
    run_apps(
        build_server_app(flat, results=results, resume_dir=resume_dir),
        build_client_app(flat),
        num_supernodes=fed.num_clients,
        client_cpus=fed.client_cpus,
        client_gpus=fed.client_gpus,
    )
    if not results:
        raise RuntimeError("the simulation ended without a result; see the log above for the ServerApp error")
    return results[-1]
