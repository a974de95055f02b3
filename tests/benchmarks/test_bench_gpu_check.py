"""benchmarks/gpu_check.py --quick: runs on any machine, its last line is one JSON object of the documented
shape, and every CUDA part it cannot run says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"rademacher", "gaussian"}


def _device_row(row: dict[str, Any], device: str) -> None:
    assert row["device"].startswith(device)
    assert row["two_forward_s"] > 0 and row["num_params"] > 0
    assert set(row["zo_step"]) == KINDS
    for step in row["zo_step"].values():
        assert step["zo_step_s"] > 0 and step["step_over_two_forward"] > 0
    assert set(row["replay"]) == {f"{kind}_K256" for kind in KINDS}
    for rep in row["replay"].values():
        assert rep["K"] == 256 and rep["nonzero_seeds"] == 8 and rep["replay_s"] > 0


def test_quick_run_prints_the_json_shape(tiny_model_dir: Path) -> None:
    # Execute: the smallest real run (1 SmolLM2 layer, one repetition) plus a local model folder.
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_check.py"),
        "--quick",
        "--num-layers",
        "1",
        "--reps",
        "1",
        "--model-dir",
        str(tiny_model_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # Assert
    assert out["benchmark"] == "gpu_check" and out["quick"] is True
    assert out["model"] == "smollm2-135m (1-layer slice)"
    _device_row(out["devices"]["cpu"], "cpu")
    _device_row(out["model_dir"], "cuda" if torch.cuda.is_available() else "cpu")
    assert out["model_dir"]["path"] == str(tiny_model_dir.resolve())
    if torch.cuda.is_available():
        _device_row(out["devices"]["cuda"], "cuda")
        assert out["z_equal_ok"] is True
        assert set(out["z_equality"]) == KINDS and out["z_equality"]["rademacher"]["bit_exact"]
        assert out["z_transfer"]["rademacher"]["alternative_values_equal"] is True
        assert out["skipped"] == {}
    else:
        reason = "torch.cuda.is_available() is False"
        for part in (out["z_equality"], out["z_transfer"], out["devices"]["cuda"]):
            assert part == {"skipped": reason}
        assert out["z_equal_ok"] is None
        assert out["skipped"] == {"z_equality": reason, "z_transfer": reason, "devices.cuda": reason}
    assert out["cuda_available"] is torch.cuda.is_available()
