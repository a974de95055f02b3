"""A node's weights on disk: verified reloads replay only what changed; bad files fall back, never mislead."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtune.algorithms.base import NodeContext
from fedtune.config import RunConfig
from fedtune.fedkseed.algorithm import FedKSeedNode
from fedtune.fedkseed.replica import build_replica, clear_replicas, get_replica
from fedtune.fedkseed.state import WEIGHTS_FILE, load_weights, save_weights
from fedtune.runtime.node import ROUNDS_FILE, client_round, load_node_data
from fedtune.wire.codec import SyncPayload, decode_reply, encode_sync

K = 64


@pytest.fixture(autouse=True)
def _fresh(fresh_models: None) -> None:
    return None


def weights(tensors: Any) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def sync_bytes(cfg: RunConfig, rnd: int, acc: np.ndarray) -> bytes:
    return encode_sync(
        SyncPayload(
            server_round=rnd,
            lr=1e-2,
            eps=cfg.zo.eps,
            num_local_steps=3,
            batch_size=2,
            num_seeds=K,
            fingerprint=get_replica(cfg).fingerprint,
            accumulator=acc,
        )
    )


def accumulator(*seeds: int) -> np.ndarray:
    acc = np.zeros(K, dtype=np.float32)  # the wire carries float32 accumulators
    for s in seeds:
        acc[s] = 0.01 * (s + 1)
    return acc


def reference_weights(cfg: RunConfig, coefficients: np.ndarray) -> torch.Tensor:
    """theta_0 + replay(C) in a replica of its own: what a node holding C must hold."""
    ref = build_replica(cfg)
    ref.client.sync_to(coefficients)
    return weights(ref.client.stepper.tuned.tensors)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_save_and_load_round_trip(run_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    cfg = run_cfg()
    client = get_replica(cfg).client
    client.sync_to(accumulator(1, 5, 9))
    path = tmp_path / WEIGHTS_FILE
    save_weights(
        path, client.stepper.tuned, client.coefficients, fingerprint=client.fingerprint, server_round=3
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_FILE]  # no temporary left behind
    loaded = load_weights(path, client.stepper.tuned, fingerprint=client.fingerprint, num_seeds=K)
    assert loaded is not None and loaded.server_round == 3
    np.testing.assert_array_equal(loaded.coefficients, client.coefficients)
    assert torch.equal(weights(loaded.tensors), weights(client.stepper.tuned.tensors))


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "garbage", "fingerprint", "num-seeds"])
def test_untrustworthy_file_is_ignored(
    run_cfg: Callable[..., RunConfig], tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = run_cfg()
    client = get_replica(cfg).client
    client.sync_to(accumulator(2, 3))
    path = tmp_path / WEIGHTS_FILE
    save_weights(
        path, client.stepper.tuned, client.coefficients, fingerprint=client.fingerprint, server_round=1
    )
    fingerprint, num_seeds = client.fingerprint, K
    raw = bytearray(path.read_bytes())
    if damage == "flip-byte":
        raw[-100] ^= 0x01  # inside the tensor data, past the header
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "fingerprint":
        fingerprint = "another-model"
    else:
        num_seeds = K * 2
    with caplog.at_level(logging.WARNING, logger="fedtune.fedkseed.state"):
        assert load_weights(path, client.stepper.tuned, fingerprint=fingerprint, num_seeds=num_seeds) is None
    assert "ignoring" in caplog.text


def test_a_fresh_process_replays_only_the_seeds_that_changed(
    run_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    cfg = run_cfg(**{"fedkseed.num-seeds": K})
    node_config = {"partition-id": 0, "state-dir": str(tmp_path / "state")}
    first = accumulator(*range(0, 40))
    reply1 = client_round(cfg, sync_bytes(cfg, 1, first), server_round=1, node_id=7,
                          node_config=node_config, run_key="run-a")  # fmt: skip
    assert isinstance(reply1, bytes)
    clear_replicas()  # the next message is a new process
    second = first.copy()
    second[[40, 41]] = [0.5, -0.25]
    reply2 = client_round(cfg, sync_bytes(cfg, 2, second), server_round=2, node_id=7,
                          node_config=node_config, run_key="run-a")  # fmt: skip
    assert isinstance(reply2, bytes)
    rounds = [json.loads(line) for line in (tmp_path / "state/run-a/client-0" / ROUNDS_FILE).open()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["outcome"] == "ok" for r in rounds)
    assert rounds[0]["state_restored"] == 0 and rounds[0]["replayed_seeds"] == 40
    # Round 2 replays the 2 new seeds plus the seeds round 1 trained locally (their value moved).
    trained = {int(s) for s in decode_reply(reply1, num_seeds=K).seed_indices}
    assert rounds[1]["state_restored"] == 1
    assert rounds[1]["replayed_seeds"] == len(trained | {40, 41})
    for key in ("data_load_s", "model_load_s", "state_load_s", "replay_s", "train_s", "state_save_s"):
        assert rounds[1][key] >= 0.0
    # The restored-and-trained model is exactly what theta_0 + replay(C) gives.
    client = get_replica(cfg).client
    assert rel_err(weights(client.stepper.tuned.tensors), reference_weights(cfg, client.coefficients)) < 1e-6


def test_a_corrupt_state_file_falls_back_to_a_full_replay(
    run_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    cfg = run_cfg(**{"fedkseed.num-seeds": K})
    node_config = {"partition-id": 1, "state-dir": str(tmp_path / "state")}
    first = accumulator(*range(10))
    assert isinstance(client_round(cfg, sync_bytes(cfg, 1, first), server_round=1, node_id=1,
                                   node_config=node_config, run_key="r"), bytes)  # fmt: skip
    state = tmp_path / "state/r/client-1" / WEIGHTS_FILE
    raw = bytearray(state.read_bytes())
    raw[-8] ^= 0xFF
    state.write_bytes(bytes(raw))
    clear_replicas()
    second = accumulator(*range(12))
    assert isinstance(client_round(cfg, sync_bytes(cfg, 2, second), server_round=2, node_id=1,
                                   node_config=node_config, run_key="r"), bytes)  # fmt: skip
    last = json.loads((tmp_path / "state/r/client-1" / ROUNDS_FILE).read_text().splitlines()[-1])
    assert last["state_restored"] == 0 and last["replayed_seeds"] == 12
    client = get_replica(cfg).client
    assert rel_err(weights(client.stepper.tuned.tensors), reference_weights(cfg, client.coefficients)) < 1e-6


def test_a_live_process_keeps_its_replica_and_writes_no_weights(
    run_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    """In a simulation actor the model stays in memory, so only the process's first round writes."""
    cfg = run_cfg(**{"fedkseed.num-seeds": K})
    data = load_node_data(cfg, {"partition-id": 0})
    node = FedKSeedNode(cfg)
    for pid in (0, 1):
        folder = tmp_path / f"client-{pid}"
        node.train(sync_bytes(cfg, 1, accumulator(1)), NodeContext(0, pid, data, folder))
    assert (tmp_path / "client-0" / WEIGHTS_FILE).is_file()
    assert not (tmp_path / "client-1" / WEIGHTS_FILE).exists()


def test_rebuild_each_round_never_keeps_weights(run_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    cfg = run_cfg(**{"fedkseed.num-seeds": K, "fedkseed.rebuild-each-round": True})
    data = load_node_data(cfg, {"partition-id": 0})
    FedKSeedNode(cfg).train(sync_bytes(cfg, 1, accumulator(1)), NodeContext(0, 0, data, tmp_path))
    assert not (tmp_path / WEIGHTS_FILE).exists()
