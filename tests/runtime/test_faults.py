"""Faults end a round, never the run or the server: one test per case, on the in-process grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.config import RunConfig
from fedtune.flower.records import RECORD, reply_from
from fedtune.flower.testing import run_local
from fedtune.runlog import read_jsonl
from fedtune.runtime.checkpoint import load_checkpoint
from fedtune.runtime.loop import build_run
from fedtune.wire.codec import decode_reply, encode_reply

ALGORITHMS = ["fedkseed", "lora-fedavg"]


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (Path(str(summary["run_dir"])) / "metrics.jsonl").read_text().splitlines()]


def state(summary: dict[str, Any]) -> dict[str, Any]:
    return dict(load_checkpoint(Path(str(summary["run_dir"]))).server_state)


def garbage(node: int, msg: Message) -> Message:
    if msg.metadata.message_type != "train":
        return msg
    msg.content = RecordDict({RECORD: ConfigRecord({"payload": b"\x08\x99garbage"})})
    return msg


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fewer_live_nodes_than_asked_samples_those_present(run_cfg: Any, algorithm: str) -> None:
    cfg: RunConfig = run_cfg(**{"run.algorithm": algorithm, "federation.num-rounds": 1})
    summary, _ = run_local(cfg, live=lambda: [1000, 1002])  # 2 of 3 nodes connected
    assert summary["completed_rounds"] == 1
    assert rows(summary)[1]["accepted"] == 2


def test_fewer_live_nodes_than_min_replies_waits_then_ends_cleanly(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(**{"federation.min-replies": 2, "federation.node-wait-s": 0.3})
    summary, _ = run_local(cfg, live=lambda: [1001])
    assert summary["stopped_early"] is True and summary["completed_rounds"] == 0
    assert "node-wait-s" in str(summary["stop_reason"])
    assert (Path(str(summary["run_dir"])) / "summary.json").is_file()
    assert not np.any(state(summary)["accumulator"])


def test_aggregator_minimum_is_a_config_error_before_the_run(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(**{"aggregator.name": "krum", "federation.clients-per-round": 2})
    with pytest.raises(ValueError, match="clients-per-round"):
        build_run(cfg)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rejections_below_the_aggregator_minimum_skip_the_round(run_cfg: Any, algorithm: str) -> None:
    # Krum needs 3 updates; one of the 3 replies is garbage each round: every round is skipped,
    # the state stays at its initial value and the run ends after max-failed-rounds.
    cfg: RunConfig = run_cfg(
        **{
            "run.algorithm": algorithm,
            "aggregator.name": "krum",
            "federation.num-rounds": 3,
            "federation.max-failed-rounds": 2,
        }
    )
    initial = build_run(cfg).server.state_dict()
    summary, _ = run_local(cfg, tamper=lambda n, m: garbage(n, m) if n == 1000 else m)
    records = rows(summary)
    assert [r.get("applied") for r in records[1:]] == [False, False]  # ended after 2 (max-failed-rounds)
    assert all("heldout_loss" not in r for r in records[1:])  # a skipped round is not evaluated
    assert summary["completed_rounds"] == 0 and summary["stopped_early"] is True
    after = state(summary)
    for key, value in initial.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value, err_msg=key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_client_exception_is_recorded_as_a_rejection(run_cfg: Any, algorithm: str) -> None:
    cfg: RunConfig = run_cfg(**{"run.algorithm": algorithm, "federation.num-rounds": 1})

    def node_config(i: int) -> dict[str, int | str]:
        # Node 2 points at a data file that does not exist: its round fails on the client.
        return {"partition-id": i, "data-path": "/no/such/file.jsonl"} if i == 2 else {"partition-id": i}

    summary, _ = run_local(cfg, node_config=node_config)
    row = rows(summary)[1]
    assert row["applied"] and row["accepted"] == 2 and row["rejected"] == 1
    assert "BAD_NODE_CONFIG" in row["rejections"] and "data-path" in row["rejections"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_crashing_client_app_becomes_an_error_reply_and_a_rejection(
    run_cfg: Any, algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedtune.runtime.node as node_module

    cfg: RunConfig = run_cfg(**{"run.algorithm": algorithm, "federation.num-rounds": 1})
    real = node_module.client_round

    def crash_on_partition_1(cfg: RunConfig, payload: bytes, **kw: Any) -> Any:
        if kw["node_config"]["partition-id"] == 1:
            raise MemoryError("out of memory")  # escapes the client glue: Flower's error path
        return real(cfg, payload, **kw)

    monkeypatch.setattr("fedtune.flower.apps.client_round", crash_on_partition_1)
    summary, _ = run_local(cfg)
    row = rows(summary)[1]
    assert row["accepted"] == 2 and row["rejected"] == 1 and "MemoryError" in row["rejections"]


def test_local_grid_turns_a_client_exception_into_an_error_reply(run_cfg: Any) -> None:
    from flwr.clientapp import ClientApp

    from fedtune.flower.testing import LocalGrid

    app = ClientApp()

    @app.train()
    def boom(msg: Message, context: Any) -> Message:
        raise RuntimeError("kaboom")

    grid = LocalGrid(app, 1)
    msg = Message(RecordDict({"x": ConfigRecord({})}), 1000, "train", group_id="1")
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "kaboom" in (reply.error.reason or "")
    parsed = reply_from(reply, 0, 1)
    assert parsed.error is not None and "kaboom" in parsed.error.message


def test_stale_sparse_sync_is_a_typed_error_and_the_node_recovers(run_cfg: Any, tmp_path: Path) -> None:
    cfg: RunConfig = run_cfg(**{"fedkseed.sparse-sync": True, "federation.num-rounds": 3})
    state_dir = tmp_path / "client-state"

    def wipe_node_1_after_round_1(node: int, msg: Message) -> Message:
        if node == 1001 and msg.metadata.message_type == "train" and msg.metadata.group_id == "1":
            for f in state_dir.rglob("client-1/*"):
                f.unlink()  # the node loses its view of A, as a re-imaged device would
        return msg

    summary, _ = run_local(cfg, state_dir=state_dir, tamper=wipe_node_1_after_round_1)
    records = rows(summary)
    # Round 2: node 1 gets a delta against round 1 it no longer holds -> typed STALE_SYNC rejection.
    assert records[2]["rejected"] == 1 and "STALE_SYNC" in records[2]["rejections"]
    # Round 3: the server resent A from zero; everyone is accepted again.
    assert records[3]["accepted"] == 3 and records[3]["rejected"] == 0


def test_a_billion_example_claim_cannot_own_the_weighted_mean(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(**{"federation.num-rounds": 1})
    seen: list[Any] = []

    def liar(node: int, msg: Message) -> Message:
        if msg.metadata.message_type != "train":
            return msg
        payload = reply_from(msg, 0, 1).payload
        assert payload is not None
        rep = decode_reply(payload, num_seeds=cfg.fedkseed.num_seeds)
        if node == 1000:
            rep = type(rep)(**{**rep.__dict__, "num_examples": 10**9})
            msg.content = RecordDict({RECORD: ConfigRecord({"payload": encode_reply(rep)})})
        seen.append(rep)
        return msg

    summary, _ = run_local(cfg, tamper=liar)
    acc = np.asarray(state(summary)["accumulator"])
    claims = [r.num_examples for r in seen]
    cap = 10 * float(np.median(claims))
    weights = np.array([min(c, cap) for c in claims])
    expect = np.zeros_like(acc)
    for w, r in zip(weights, seen, strict=True):
        np.add.at(
            expect, r.seed_indices, -cfg.zo.lr * r.projected_grads.astype(np.float64) * w / weights.sum()
        )
    np.testing.assert_allclose(acc, expect, rtol=1e-5, atol=1e-12)
    assert weights[0] / weights.sum() < 0.9  # without the cap it would be 1 - 1e-7


def test_cosine_schedule_runs_to_the_last_round(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(**{"zo.lr-schedule": "cosine", "zo.lr-min": 1e-3, "federation.num-rounds": 3})
    summary, _ = run_local(cfg)
    lrs = [r["lr"] for r in rows(summary)[1:]]
    assert (
        summary["completed_rounds"] == 3 and lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)
    )
    with pytest.raises(ValueError, match=r"zo\.lr-min"):
        run_cfg(**{"zo.lr-schedule": "cosine"})


def test_a_restarted_node_is_sampled_under_its_new_node_id(run_cfg: Any) -> None:
    from flwr.app import Context

    from fedtune.flower.apps import build_client_app
    from fedtune.flower.testing import LocalGrid
    from fedtune.flower.transport import GridTransport

    cfg: RunConfig = run_cfg()
    grid = LocalGrid(build_client_app(cfg.to_flat()), 3)
    transport = GridTransport(grid)
    assert transport.clients() == [0, 1, 2]
    # Node 1000 (client 0) restarts: Flower gives it a new node id; a duplicate claim is refused.
    old = grid.contexts.pop(1000)
    grid.contexts[2000] = Context(
        run_id=old.run_id,
        node_id=2000,
        state=old.state,
        node_config=old.node_config,
        run_config=old.run_config,
    )
    grid.contexts[3000] = Context(
        run_id=old.run_id, node_id=3000, state=old.state, node_config={"partition-id": 1}, run_config={}
    )
    assert transport.clients() == [0, 1, 2]
    assert transport.client_of == {2000: 0, 1001: 1, 1002: 2}


def test_a_node_that_never_replies_is_a_rejection_after_the_timeout(run_cfg: Any) -> None:
    cfg: RunConfig = run_cfg(**{"federation.num-rounds": 1, "federation.round-timeout-s": 0.3})

    def lose_node_2(node: int, msg: Message) -> Message | None:
        return None if node == 1002 and msg.metadata.message_type == "train" else msg

    summary, _ = run_local(cfg, tamper=lose_node_2)
    row = rows(summary)[1]
    assert row["applied"] and row["accepted"] == 2 and "no reply within" in row["rejections"]


def test_nodes_given_their_own_data_files_train_from_those_files_only(run_cfg: Any, tmp_path: Path) -> None:
    from fedtune.cli import main
    from fedtune.experiment import build_federated_data
    from fedtune.runtime.node import load_node_data

    cfg: RunConfig = run_cfg(**{"federation.num-rounds": 1})
    out = tmp_path / "parts"
    flat = [
        f"{k}={json.dumps(v)}"
        for k, v in cfg.to_flat().items()
        if k.startswith(("data.", "federation.", "run.seed"))
    ]
    assert main(["partition", "--out", str(out), *(a for kv in flat for a in ("--set", kv))]) == 0
    parts = build_federated_data(cfg).train_partitions
    for i, part in enumerate(parts):
        mine = load_node_data(cfg, {"partition-id": i, "data-path": str(out / f"client-{i}.jsonl")})
        assert sorted(mine.examples["prompt"]) == sorted(part["prompt"])  # the same rows, its own only

    def node_config(i: int) -> dict[str, int | str]:
        return {"partition-id": i, "data-path": str(out / f"client-{i}.jsonl")}

    summary, _ = run_local(cfg, node_config=node_config)
    assert rows(summary)[1]["accepted"] == 3


def test_a_node_slow_to_answer_its_first_query_is_asked_again(run_cfg: Any) -> None:
    """A node still starting when the server first asks who it is (its query reply is lost)
    is asked again on the next look, not written off for the whole run."""
    cfg = run_cfg(**{"federation.num-rounds": 2})
    dropped: list[int] = []

    def slow_start(node: int, msg: Message) -> Message | None:
        if node == 1002 and msg.metadata.message_type.startswith("query") and not dropped:
            dropped.append(node)
            return None
        return msg

    summary, _ = run_local(cfg, tamper=slow_start)
    assert dropped == [1002]
    assert summary["completed_rounds"] == 2
    rows = read_jsonl(Path(str(summary["run_dir"])) / "metrics.jsonl")
    assert [r["accepted"] for r in rows[1:]] == [2, 3]  # round 1 went on without it; round 2 has it


def test_train_messages_expire_after_the_round_so_a_returning_node_skips_stale_work(run_cfg: Any) -> None:
    from fedtune.flower.testing import LocalGrid
    from fedtune.flower.transport import TTL_MARGIN_S

    cfg: RunConfig = run_cfg(**{"federation.num-rounds": 1, "federation.round-timeout-s": 42.0})
    _, grid = run_local(cfg)
    assert isinstance(grid, LocalGrid)
    train = [m for m in grid.delivered if m.metadata.message_type == "train"]
    assert train and {m.metadata.ttl for m in train} == {42.0 + TTL_MARGIN_S}
