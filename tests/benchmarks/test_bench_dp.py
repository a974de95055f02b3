"""benchmarks/dp.py --quick: the privacy-utility points, the secure-aggregation figures, the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

BENCHMARK = "dp"


@pytest.mark.usefixtures("fresh_models")
def test_quick_run_reports_points_and_secagg_figures(
    bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    bench.main(["--quick", "--output-dir", str(tmp_path / "runs"), "--out", str(out)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    points = result["points"]
    assert math.isinf(points[0]["epsilon"]) and len(points) == 1 + len(bench.QUICK_SIGMAS)
    eps = [p["epsilon"] for p in points[1:]]
    assert all(e > 0 for e in eps) and eps == sorted(eps, reverse=True)  # more noise, less epsilon
    assert all(0 < p["epsilon_prv"] <= p["epsilon"] * 1.05 for p in points[1:])
    for key in ("secagg_round_s", "plain_round_s", "secagg_bytes", "plain_bytes", "secagg_protocol_s"):
        assert result[key] > 0, key
    assert result["secagg_bytes"] > result["plain_bytes"]  # keys, shares, and 8 bytes per coordinate
    assert (out / "dp.png").stat().st_size > 0
    # the sweep is reused only for the same settings
    again = bench.reuse_curve(str(out / "dp.json"), {"config": result["config"], "clip": result["clip"]},
                              list(bench.QUICK_SIGMAS))  # fmt: skip
    assert again is not None and again[0][1:] == points[1:]
    assert bench.reuse_curve(str(out / "dp.json"), {"config": {}, "clip": 1.0}, []) is None
