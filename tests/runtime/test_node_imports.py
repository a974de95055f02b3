"""A node's process imports what its algorithm needs and nothing else: in deployment every message
starts a fresh ClientApp process, so every module imported at start is paid every round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# (grpc is not listed: Flower itself imports it.)
NOT_FOR_A_FEDKSEED_CLIENT = (
    "flwr_datasets",
    "seaborn",
    "matplotlib",
    "peft",
    "opacus",
    "fedtune.sap",
    "fedtune.lora",
    "fedtune.runtime.loop",
    "fedtune.recorder",
)

_SCRIPT = """
import json, sys
import client.app  # what flwr-clientapp loads
at_start = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'datasets'})
from fedtune.config import RunConfig
from fedtune.fedkseed.replica import get_replica
from fedtune.runtime.node import client_round
from fedtune.wire.codec import SyncPayload, encode_sync
import numpy as np
cfg = RunConfig.from_flat(json.loads(sys.argv[1]))
node_config = json.loads(sys.argv[2])
sync = SyncPayload(server_round=1, lr=1e-2, eps=1e-3, num_local_steps=1, batch_size=2,
                   num_seeds=cfg.fedkseed.num_seeds, fingerprint=get_replica(cfg).fingerprint,
                   accumulator=np.zeros(cfg.fedkseed.num_seeds, dtype=np.float32))
out = client_round(cfg, encode_sync(sync), server_round=1, node_id=1, node_config=node_config, run_key="r")
print(json.dumps({"ok": isinstance(out, bytes), "at_start": at_start, "modules": sorted(sys.modules)}))
"""


@pytest.mark.slow
def test_a_fedkseed_client_process_imports_only_what_fedkseed_needs(
    tiny_run_flat: dict[str, Any], tmp_path: Path
) -> None:
    data = tmp_path / "node.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "yes"}) + "\n" for i in range(4)))
    node_config = {"partition-id": 0, "data-path": str(data), "state-dir": str(tmp_path / "state")}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(tiny_run_flat), json.dumps(node_config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"]
    assert result["at_start"] == []  # the ClientApp module itself loads no ML stack
    modules = set(result["modules"])
    assert {"torch", "transformers", "fedtune.fedkseed.client"} <= modules  # the control: it did train
    loaded = [m for m in NOT_FOR_A_FEDKSEED_CLIENT if m in modules]
    assert loaded == [], f"a FedKSeed client process imported {loaded}"
