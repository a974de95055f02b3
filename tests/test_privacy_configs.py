"""The privacy configs in simulations/: they pass the run's checks and train at tiny size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedtune.config import RunConfig
from fedtune.flower.testing import run_local
from fedtune.runtime.loop import check_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("dp_fedkseed.toml", "secagg.toml", "dp_fedkseed_secagg.toml")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.usefixtures("fresh_models")
def test_privacy_config_checks_and_runs_at_tiny_size(
    name: str, tiny_run_flat: dict[str, Any], tmp_path: Path
) -> None:
    cfg = RunConfig.load(ROOT / "simulations" / name)
    check_config(cfg)
    # the file's privacy, secagg, algorithm and aggregator settings on the tiny run
    keep = {
        k: v
        for k, v in cfg.to_flat().items()
        if k.split(".")[0] in ("privacy", "secagg", "aggregator", "run")
    }
    keep.pop("run.output-dir")
    tiny = RunConfig.from_flat({**tiny_run_flat, **keep, "federation.num-rounds": 1})
    assert (tiny.privacy, tiny.secagg) == (cfg.privacy, cfg.secagg)
    summary, _ = run_local(tiny, run_dir=tmp_path / "run")
    row = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    assert summary["completed_rounds"] == 1 and row["accepted"] == 3
    assert ("epsilon" in row) == cfg.privacy.enabled
    assert ("secagg_survivors" in row) == cfg.secagg.enabled
