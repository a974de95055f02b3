"""Algorithms without an (epsilon, delta) mechanism refuse a privacy config with a reason."""

from __future__ import annotations

from typing import Any

import pytest

from fedtune.algorithms.registry import create_algorithm


@pytest.mark.parametrize("mechanism", ["sample", "client"])
def test_sap_refuses_dp_and_names_its_privatizer(run_cfg: Any, mechanism: str) -> None:
    extra = {"aggregator.options.weighting": "equal"} if mechanism == "client" else {}
    cfg = run_cfg(
        **{"run.algorithm": "sap", "privacy.mechanism": mechanism, "privacy.noise-multiplier": 1.0, **extra}
    )
    with pytest.raises(ValueError, match="d_chi privatizer"):
        create_algorithm(cfg)


def test_sap_without_dp_is_built(run_cfg: Any) -> None:
    assert create_algorithm(run_cfg(**{"run.algorithm": "sap"})).cfg.privacy.mechanism == "none"
