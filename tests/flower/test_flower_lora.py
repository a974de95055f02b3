"""LoRA-FedAvg (FedIT) baseline through real ServerApp/ClientApp code on the in-process grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.aggregators import create_aggregator
from fedtune.config import RunConfig
from fedtune.fedkseed.server import Rejection
from fedtune.flower.apps import build_client_app
from fedtune.flower.lora_apps import run_lora_fedavg
from fedtune.flower.testing import LocalGrid
from fedtune.lora.server import AdapterReply, LoRAFedAvgServer


def test_lora_fedavg_round_trains_and_reports_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = RunConfig.from_flat(
        {
            "run.algorithm": "lora-fedavg",
            "model.name": str(tiny_model_dir),
            "model.max-length": 48,
            "data.max-train-examples": 40,
            "data.heldout-size": 8,
            "data.eval-generations": 0,
            "lora.local-steps": 2,
            "lora.batch-size": 2,
            "lora.lr": 1e-2,
            "federation.num-clients": 2,
            "federation.clients-per-round": 2,
            "federation.num-rounds": 1,
            "run.output-dir": str(tmp_path),
        }
    )
    summary = run_lora_fedavg(LocalGrid(build_client_app(cfg.to_flat()), 2), cfg, quiet=True)
    assert summary["completed_rounds"] == 1
    assert summary["final_heldout_loss"] < summary["initial_heldout_loss"]
    # whole adapter each way: orders of magnitude more than FedKSeed's seeds and scalars
    assert summary["mean_payload_bytes_up"] > 10_000 and summary["mean_payload_bytes_down"] > 10_000
    assert (Path(summary["run_dir"]) / "adapter.npz").is_file()


def test_lora_server_is_fedavg_on_weights_and_rejects_bad_replies() -> None:
    server = LoRAFedAvgServer({"a": np.zeros(3, np.float32)}, create_aggregator("weighted-mean"))

    def reply(node: int, value: object, n: int = 1, rnd: int = 1) -> AdapterReply:
        return AdapterReply(node, rnd, n, {"a": np.asarray(value)}, train_loss=1.0, peak_memory_mb=0.0)

    good = [reply(1, np.ones(3, np.float32), n=1), reply(2, np.full(3, 4.0, np.float32), n=3)]
    bad = [
        reply(3, np.ones(3, np.float64)),
        reply(4, np.ones(4, np.float32)),
        reply(5, np.array([np.nan, 0, 0], np.float32)),
        reply(6, np.ones(3, np.float32), rnd=2),
        reply(1, np.ones(3, np.float32)),
    ]
    out = server.aggregate_round(1, good + bad, expected={1, 2, 3, 4, 5, 6}, min_replies=1)
    np.testing.assert_allclose(server.global_arrays["a"], np.full(3, 3.25))  # (1*1 + 3*4) / 4
    reasons = [r.reason for r in out.rejected]
    assert len(reasons) == 5 and all(isinstance(r, Rejection) for r in out.rejected)
    for needle in ("dtype", "shape", "NaN", "round 2", "duplicate"):
        assert any(needle in r for r in reasons), needle


@pytest.mark.parametrize("min_replies", [3])
def test_lora_server_below_min_replies_keeps_state(min_replies: int) -> None:
    server = LoRAFedAvgServer({"a": np.zeros(2, np.float32)}, create_aggregator("weighted-mean"))
    one = AdapterReply(1, 1, 1, {"a": np.ones(2, np.float32)}, train_loss=1.0, peak_memory_mb=0.0)
    out = server.aggregate_round(1, [one], expected={1}, min_replies=min_replies)
    assert not out.applied and not server.global_arrays["a"].any()
