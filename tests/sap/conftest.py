"""Split-and-privatize fixtures: run configs on the real 2-layer MiniLM (classification) or the
tiny random Llama (causal LM), writing into the test's tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedtune.config import RunConfig

SAP_RUN: dict[str, Any] = {
    "run.algorithm": "sap",
    "model.name": "minilm-l6",
    "model.num-layers": 2,
    "model.max-length": 40,
    "data.task": "reviews-text",
    "data.max-train-examples": 120,
    "data.heldout-size": 32,
    "data.eval-generations": 0,
    "federation.num-clients": 3,
    "federation.clients-per-round": 3,
    "federation.num-rounds": 2,
    "federation.node-wait-s": 1.0,
    "algorithm.options.local-steps": 3,
    "algorithm.options.batch-size": 4,
    "algorithm.options.lr": 1e-3,
}


@pytest.fixture
def sap_cfg(tmp_path: Path) -> Any:
    """``sap_cfg(**dotted_overrides) -> RunConfig``, e.g. ``sap_cfg(**{"algorithm.options.eta": 50.0})``."""

    def make(**extra: Any) -> RunConfig:
        return RunConfig.from_flat({**SAP_RUN, "run.output-dir": str(tmp_path / "runs"), **extra})

    return make


@pytest.fixture
def causal_sap_cfg(sap_cfg: Any, tiny_model_dir: Path) -> Any:
    """The same on the tiny random Llama: causal LM on the reviews instruction task."""

    def make(**extra: Any) -> RunConfig:
        base = {
            "model.name": str(tiny_model_dir),
            "model.num-layers": 0,
            "model.max-length": 48,
            "data.task": "reviews",
            "algorithm.options.task": "causal-lm",
            "algorithm.options.lr": 1e-2,
        }
        return sap_cfg(**{**base, **extra})

    return make
