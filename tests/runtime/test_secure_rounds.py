"""Secure aggregation on the run loop: the real ServerApp/ClientApp code on the in-process grid.

The secure sum must give the plain run's model (within the fixed-point error), survive dropouts
down to the threshold, abort cleanly below it, and refuse configurations it cannot serve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from fedtune.config import RunConfig
from fedtune.flower.records import reply_from
from fedtune.flower.testing import run_local
from fedtune.runtime.checkpoint import load_checkpoint
from fedtune.runtime.loop import check_config
from fedtune.runtime.secure import threshold_for, weighted_vector
from fedtune.secagg import Stage, decode_envelope

SECURE = {"secagg.enabled": True}
# A dropped node never answers: each stage waits this long for it.
DROP = {"federation.round-timeout-s": 0.5}


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stage_of(msg: Message) -> Stage | None:
    if msg.metadata.message_type != "train" or msg.has_error():
        return None
    payload = reply_from(msg, 0, 1).payload
    if payload is None:
        return None
    return decode_envelope(payload)[0]


def drop(nodes: set[int], at: Stage, *, from_round: int = 1) -> Any:
    """A tamper hook: the given nodes' replies to stage ``at`` never arrive (the node dropped)."""
    seen: dict[int, int] = {}

    def tamper(node: int, msg: Message) -> Message | None:
        stage = _stage_of(msg)
        if stage == Stage.SETUP:
            seen[node] = seen.get(node, 0) + 1
        if node in nodes and stage == at and seen.get(node, 0) >= from_round:
            return None
        return msg

    return tamper


def test_threshold_and_weighted_vector() -> None:
    cfg = RunConfig.from_flat({"secagg.enabled": True, "federation.clients-per-round": 3})
    assert threshold_for(cfg, 3) == 2 and threshold_for(cfg, 10) == 7 and threshold_for(cfg, 2) == 2
    v = weighted_vector(np.array([2.0, -4.0]), 50.0, max_weight=100.0)
    np.testing.assert_allclose(v, [1.0, -2.0, 0.5])
    with pytest.raises(ValueError, match="max-weight"):
        weighted_vector(np.zeros(2), 200.0, max_weight=100.0)


@pytest.mark.usefixtures("fresh_models")
def test_secure_run_equals_the_plain_run(run_cfg: Any, tmp_path: Path) -> None:
    extra = {"fedkseed.rebuild-each-round": True}
    plain_cfg: RunConfig = run_cfg(**extra)
    secure_cfg: RunConfig = run_cfg(**extra, **SECURE)
    run_local(plain_cfg, run_dir=tmp_path / "plain")
    from fedtune.fedkseed.replica import clear_replicas

    clear_replicas()
    summary, _ = run_local(secure_cfg, run_dir=tmp_path / "secure")
    assert summary["completed_rounds"] == 2
    a = np.asarray(load_checkpoint(tmp_path / "plain").server_state["accumulator"])
    b = np.asarray(load_checkpoint(tmp_path / "secure").server_state["accumulator"])
    assert np.abs(a).max() > 0
    # the plain path rounds each update to float32; the secure sum is float64 within 2^-41 per client
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)
    # float32 like the plain path: a node holding A replays nothing at its next sync
    np.testing.assert_array_equal(b.astype(np.float32).astype(np.float64), b)
    rows = _rows(tmp_path / "secure")
    assert all(r["secagg_survivors"] == 3 and r["accepted"] == 3 for r in rows if r["round"] >= 1)
    # the server got only masked vectors: the public replies carry no scalars
    assert all(r["payload_bytes_up"] < 200 for r in rows if r["round"] >= 1)


@pytest.mark.usefixtures("fresh_models")
@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.KEYS, Stage.MASK, Stage.UNMASK])
def test_one_dropout_at_any_stage_still_aggregates(run_cfg: Any, tmp_path: Path, stage: Stage) -> None:
    cfg: RunConfig = run_cfg(**SECURE, **DROP, **{"federation.num-rounds": 1})
    summary, _ = run_local(cfg, run_dir=tmp_path / "run", tamper=drop({1001}, stage))
    row = _rows(tmp_path / "run")[1]
    assert row["applied"] is True, row
    survivors = 2 if stage != Stage.UNMASK else 3  # a node lost after masking is still in the sum
    assert row["secagg_survivors"] == survivors
    assert summary["completed_rounds"] == 1


@pytest.mark.usefixtures("fresh_models")
def test_below_threshold_the_round_aborts_and_the_state_is_untouched(run_cfg: Any, tmp_path: Path) -> None:
    cfg: RunConfig = run_cfg(
        **SECURE, **DROP, **{"federation.num-rounds": 1, "federation.max-failed-rounds": 1}
    )
    summary, _ = run_local(cfg, run_dir=tmp_path / "run", tamper=drop({1000, 1001}, Stage.MASK))
    row = _rows(tmp_path / "run")[1]
    assert row["applied"] is False and "secure aggregation aborted" in row["note"]
    state = load_checkpoint(tmp_path / "run").server_state
    assert not np.asarray(state["accumulator"]).any()
    assert summary["completed_rounds"] == 0


@pytest.mark.usefixtures("fresh_models")
def test_the_client_state_is_private_and_gone_after_the_round(run_cfg: Any, tmp_path: Path) -> None:
    cfg: RunConfig = run_cfg(**SECURE, **{"federation.num-rounds": 1})
    modes: list[int] = []

    def watch(node: int, msg: Message) -> Message:
        if _stage_of(msg) == Stage.KEYS:
            for f in (tmp_path / "state").rglob("secagg-client.bin"):
                modes.append(f.stat().st_mode & 0o777)
        return msg

    run_local(cfg, run_dir=tmp_path / "run", state_dir=tmp_path / "state", tamper=watch)
    assert modes and all(m == 0o600 for m in modes)
    assert not list((tmp_path / "state").rglob("secagg-client.bin"))


@pytest.mark.usefixtures("fresh_models")
def test_dp_fedkseed_combines_with_secure_aggregation(run_cfg: Any, tmp_path: Path) -> None:
    cfg: RunConfig = run_cfg(
        **SECURE,
        **{"privacy.mechanism": "sample", "privacy.noise-multiplier": 1.0, "federation.num-rounds": 1},
    )
    run_local(cfg, run_dir=tmp_path / "run")
    row = _rows(tmp_path / "run")[1]
    assert row["applied"] is True and row["accepted"] == 3 and row["epsilon"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"aggregator.name": "krum", "aggregator.options.num-byzantine": 0}, "needs each client's update"),
        ({"aggregator.name": "median"}, "needs each client's update"),
        ({"run.algorithm": "fedkseed-pro"}, "does not implement secure aggregation"),
    ],
)
def test_secure_aggregation_refuses_what_it_cannot_serve(
    run_cfg: Any, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_config(run_cfg(**SECURE, **extra))


def test_secure_aggregation_needs_three_clients_and_a_safe_modulus(run_cfg: Any) -> None:
    with pytest.raises(ValueError, match="clients-per-round >= 3"):
        run_cfg(**SECURE, **{"federation.clients-per-round": 2, "federation.min-replies": 1})
    with pytest.raises(ValueError, match="overflow"):
        run_cfg(**SECURE, **{"secagg.fraction-bits": 52, "secagg.clip": 1e6})


@pytest.mark.usefixtures("fresh_models")
def test_secure_lora_fedavg_equals_the_plain_run(run_cfg: Any, tmp_path: Path) -> None:
    plain: RunConfig = run_cfg(**{"run.algorithm": "lora-fedavg", "federation.num-rounds": 1})
    secure: RunConfig = run_cfg(**{"run.algorithm": "lora-fedavg", "federation.num-rounds": 1}, **SECURE)
    run_local(plain, run_dir=tmp_path / "plain")
    from fedtune.lora.algorithm import clear_lora_models

    clear_lora_models()
    run_local(secure, run_dir=tmp_path / "secure")
    a = load_checkpoint(tmp_path / "plain").server_state
    b = load_checkpoint(tmp_path / "secure").server_state
    arrays = [k for k, v in a.items() if isinstance(v, np.ndarray) and v.dtype == np.float32]
    assert arrays
    for key in arrays:
        np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    assert _rows(tmp_path / "secure")[1]["payload_bytes_up"] < 300  # no adapter in the clear
