"""A run stopped after round k and resumed ends bit-identical to a run that never stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedtune.config import RunConfig
from fedtune.fedkseed.replica import clear_replicas
from fedtune.flower.testing import run_local
from fedtune.lora.algorithm import clear_lora_models
from fedtune.runtime.checkpoint import load_checkpoint

# Wall-clock and process-memory measurements differ between any two runs; the rest must match bit
# for bit.
TIMING = {"elapsed_s", "time", "round_s", "eval_s", "client_peak_mb"}


def rows(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in text.splitlines()]


def new_process() -> None:
    """What a fresh process has: no cached model."""
    clear_replicas()
    clear_lora_models()


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("fedkseed", {"fedkseed.rebuild-each-round": True}),
        ("fedkseed-pro", {"fedkseed.rebuild-each-round": True, "fedkseed.sparse-sync": True}),
        ("lora-fedavg", {}),
    ],
)
def test_stop_after_round_1_then_resume_equals_no_stop(
    run_cfg: Any, tmp_path: Path, algorithm: str, extra: dict[str, Any]
) -> None:
    cfg: RunConfig = run_cfg(**{"run.algorithm": algorithm, "federation.num-rounds": 3, **extra})
    # Uninterrupted reference.
    full, _ = run_local(cfg, run_dir=tmp_path / "full", state_dir=tmp_path / "state-full")
    # Stopped after round 1 (as if killed), then resumed by a fresh process.
    new_process()
    stopped, _ = run_local(cfg, run_dir=tmp_path / "resumed", state_dir=tmp_path / "state", stop_after=1)
    assert stopped.get("interrupted") is True and load_checkpoint(tmp_path / "resumed").server_round == 1
    new_process()
    resumed, _ = run_local(cfg, run_dir=tmp_path / "resumed", resume=True, state_dir=tmp_path / "state")
    # Server state: bit-identical.
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "resumed")
    assert a.server_round == b.server_round == 3
    assert a.server_state.keys() == b.server_state.keys()
    for key, value in a.server_state.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(b.server_state[key], value, err_msg=key)
        else:
            assert b.server_state[key] == value, key
    # Metrics: identical rows (timings aside), one per round, none duplicated by the resume.
    assert rows(tmp_path / "resumed") == rows(tmp_path / "full")
    assert [r["round"] for r in rows(tmp_path / "resumed")] == [0, 1, 2, 3]
    assert resumed["completed_rounds"] == full["completed_rounds"] == 3
    for key in ("final_heldout_loss", "mean_payload_bytes_up", "mean_payload_bytes_down"):
        assert resumed[key] == full[key], key


def test_resume_refuses_another_config_and_a_corrupt_checkpoint(run_cfg: Any, tmp_path: Path) -> None:
    cfg: RunConfig = run_cfg()
    run_local(cfg, run_dir=tmp_path / "run", stop_after=1)
    other = run_cfg(**{"zo.lr": 5e-3})
    with pytest.raises(ValueError, match=r"differs in zo\.lr"):
        run_local(other, run_dir=tmp_path / "run", resume=True)
    arrays = next((tmp_path / "run" / "checkpoints").glob("round-*/arrays.npz"))
    arrays.write_bytes(arrays.read_bytes()[:-7] + b"garbage")
    with pytest.raises(ValueError, match="SHA-256"):
        run_local(cfg, run_dir=tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match=r"no config\.toml"):
        run_local(cfg, run_dir=tmp_path / "nothing", resume=True)
