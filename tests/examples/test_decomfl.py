"""DeComFL in examples/decomfl/, loaded the way a run config loads it (no edit to fedtune/).

One 4-round run on the in-process grid (tiny random Llama, 3 clients) serves the end-to-end,
catch-up and stale-client tests; it is shared because a run costs seconds:

* rounds 1-2: every client trains (each node then holds version 1 on disk);
* round 3: node 2 is offline and node 1's on-disk state is deleted first, so node 1 answers
  STALE_SYNC and only node 0 counts;
* round 4: everyone is back: node 2 catches up from version 1 (rounds 2 and 3 replayed), node 1
  from theta_0 (the server forgot it), node 0 from version 2.
"""

from __future__ import annotations

import importlib
import json
import random
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedtune.aggregators import create_aggregator
from fedtune.algorithms import NodeReply, create_algorithm, resolve_algorithm
from fedtune.config import RunConfig, flatten
from fedtune.flower.records import reply_from
from fedtune.flower.testing import run_local
from fedtune.runtime.checkpoint import load_checkpoint
from fedtune.wire.errors import ClientErrorPayload, ErrorCode

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "simulations" / "decomfl.toml"
SPEC = "examples.decomfl.decomfl:DeComFL"
TAU = 3
TINY: dict[str, Any] = {
    "model.max-length": 48,
    "data.max-train-examples": 60,
    "data.heldout-size": 8,
    "data.eval-generations": 2,
    "data.max-new-tokens": 2,
    "zo.local-steps": TAU,
    "zo.batch-size": 2,
    "zo.lr": 1e-3,  # 1e-2 diverges on this random tiny model (FedKSeed's too)
    "federation.num-clients": 3,
    "federation.clients-per-round": 3,
    "federation.min-replies": 1,
    "federation.num-rounds": 4,
    "federation.node-wait-s": 1.0,
}


@dataclass(frozen=True)
class Mods:
    decomfl: ModuleType
    payload: ModuleType
    replica: ModuleType
    server: ModuleType


def _load_modules() -> Mods:
    resolve_algorithm(SPEC)  # imports examples.decomfl from the repo root, as a run does
    return Mods(
        *(
            importlib.import_module(f"examples.decomfl.{m}")
            for m in ("decomfl", "payload", "replica", "server")
        )
    )


@pytest.fixture(autouse=True)
def from_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)


@pytest.fixture(scope="module")
def mods() -> Mods:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)
        return _load_modules()


def tiny_cfg(model_dir: Path, out: Path, **extra: Any) -> RunConfig:
    return RunConfig.load(CONFIG, {**TINY, "model.name": str(model_dir), "run.output-dir": str(out), **extra})


@dataclass
class Scenario:
    cfg: RunConfig
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    state_root: Path
    syncs: dict[tuple[int, int], Any] = field(default_factory=dict)  # (round, cid) -> SyncPayload
    replies: dict[tuple[int, int], NodeReply] = field(default_factory=dict)
    catch_up: dict[str, Any] = field(default_factory=dict)


def _rng_state() -> tuple[torch.Tensor, np.ndarray, object]:
    keys = np.array(np.random.get_state(legacy=True)[1], copy=True)  # type: ignore[index]
    return torch.random.get_rng_state(), keys, random.getstate()


def run_tiny(cfg: RunConfig, **kwargs: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``run_local`` with one intra-op thread: tiny matrices gain nothing from more (and threads
    spin on a busy CPU); returns the summary and the metrics.jsonl rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary, _ = run_local(cfg, **kwargs)
    finally:
        torch.set_num_threads(threads)
    text = (Path(str(summary["run_dir"])) / "metrics.jsonl").read_text()
    return summary, [json.loads(x) for x in text.splitlines()]


@pytest.fixture(scope="module")
def scenario(
    mods: Mods, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    """The 4-round run described in the module docstring (it checks the global RNG itself, as
    the function-scoped guard in conftest.py does not cover module fixtures)."""
    tmp = tmp_path_factory.mktemp("decomfl")
    cfg = tiny_cfg(tiny_model_dir, tmp / "runs")
    state_root = tmp / "state"
    view_file = mods.replica.VIEW_FILE
    done = {"round": 0}
    captured: dict[str, Any] = {}
    syncs: dict[tuple[int, int], Any] = {}
    replies: dict[tuple[int, int], NodeReply] = {}

    def live() -> list[int]:
        if done["round"] + 1 == 3:  # round 3: node 1 lost its state, node 2 is offline
            for f in state_root.glob(f"*/client-1/{view_file}"):
                f.unlink()
            return [1000, 1001]
        return [1000, 1001, 1002]

    def tamper(node: int, msg: Message) -> Message:
        if msg.metadata.message_type == "train":
            rnd, cid = int(msg.metadata.group_id), node - 1000
            replies[(rnd, cid)] = reply_from(msg, cid, rnd)
            done["round"] = max(done["round"], rnd)
        return msg

    original = mods.decomfl.DeComFLClient.catch_up

    def spy(self: Any, sync: Any, node: Any) -> Any:
        syncs[(sync.server_round, node.partition_id)] = sync
        if (sync.server_round, node.partition_id) != (4, 2):
            return original(self, sync, node)
        # Node 2 missed round 3 and holds version 1 on disk. Start it from a fresh process's replica
        # moved to version 1 (its own model after undoing its round-2 steps), so the catch-up
        # below replays exactly the missed rounds' seeds with their aggregated scalars.
        mods.replica.clear_replicas()
        replica = mods.replica.get_replica(self.cfg)
        held = mods.replica.NodeView.load(node.state_dir / view_file)
        captured["held_version"] = held.version
        replica.sync_to(held.coefficients)
        before = replica.coefficients.copy()
        view = original(self, sync, node)
        captured["replayed"] = len(replica.coefficients.minus(before)[0])
        captured["model"] = [t.detach().clone() for t in replica.stepper.tuned.tensors]
        captured["view"] = view
        return view

    torch_rng, numpy_rng, python_rng = _rng_state()
    mods.replica.clear_replicas()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)
        mp.setattr(mods.decomfl.DeComFLClient, "catch_up", spy)
        summary, rows = run_tiny(cfg, state_dir=state_root, live=live, tamper=tamper)
    after = _rng_state()
    assert (
        torch.equal(torch_rng, after[0]) and np.array_equal(numpy_rng, after[1]) and python_rng == after[2]
    ), "DeComFL touched a global RNG; use an explicit generator"
    yield Scenario(cfg, summary, rows, state_root, syncs, replies, captured)
    mods.replica.clear_replicas()


def restored_server(mods: Mods, sc: Scenario) -> Any:
    server = create_algorithm(sc.cfg).server(create_aggregator(sc.cfg.aggregator.name))
    server.load_state_dict(load_checkpoint(Path(str(sc.summary["run_dir"]))).server_state)
    return server


# -- config and options ------------------------------------------------------------------------


def test_config_loads_and_selects_the_example(mods: Mods) -> None:
    cfg = RunConfig.load(CONFIG)
    assert cfg.run.algorithm == SPEC
    assert dict(cfg.algorithm.options) == {"num-perturbations": 1, "rebuild-each-round": False}
    # the main job's model, data, federation, step budget and aggregator; every key spelled out
    default = RunConfig()
    assert (cfg.model, cfg.data, cfg.federation, cfg.zo, cfg.aggregator) == (
        default.model,
        default.data,
        default.federation,
        default.zo,
        default.aggregator,
    )
    keys = set(flatten(tomllib.loads(CONFIG.read_text())))
    options = {"algorithm.options.num-perturbations", "algorithm.options.rebuild-each-round"}
    assert keys == set(default.to_flat()) | options
    algo = create_algorithm(cfg)
    assert type(algo) is mods.decomfl.DeComFL and algo.num_perturbations == 1
    assert not algo.rebuild_each_round


def test_bad_options_are_refused_with_the_accepted_ones() -> None:
    bogus = RunConfig.load(CONFIG, {"algorithm.options.bogus": 1})
    with pytest.raises(
        ValueError, match=r"takes no option 'bogus'; its options are: num-perturbations, rebuild-each-round"
    ):
        create_algorithm(bogus)
    mistyped = RunConfig.load(CONFIG, {"algorithm.options.num-perturbations": "two"})
    with pytest.raises(ValueError, match=r"'num-perturbations' must be an int"):
        create_algorithm(mistyped)
    zero = RunConfig.load(CONFIG, {"algorithm.options.num-perturbations": 0})
    with pytest.raises(ValueError, match=r"DeComFL: num-perturbations must be in \[1, 1024\]"):
        create_algorithm(zero)


# -- payloads and the server half without a model ----------------------------------------------


def test_payload_round_trip_and_malformed_bytes(mods: Mods) -> None:
    p = mods.payload
    seeds = np.array([5, 1, 7, 2, 9, 4], dtype=np.uint32)
    entry = p.HistoryEntry(2, 0.01, seeds[::-1].copy(), np.array([1, -2, 3, 0, 5, 6], dtype=np.float32))
    sync = p.SyncPayload(3, 1, 3, 2, 4, 0.01, 1e-3, "ab" * 32, seeds, (entry,))
    back = p.decode_sync(p.encode_sync(sync))
    assert (back.server_round, back.base_round, back.num_local_steps, back.num_perturbations) == (3, 1, 3, 2)
    assert back.fingerprint == "ab" * 32 and back.lr == 0.01 and back.eps == 1e-3
    np.testing.assert_array_equal(back.seeds, seeds)
    np.testing.assert_array_equal(back.entries[0].scalars, entry.scalars)
    reply = p.ReplyPayload(3, 2, 17, 1, 0.5, 12.0, np.arange(6, dtype=np.float32))
    raw = p.encode_reply(reply)
    assert len(raw) == p.REPLY_HEADER.size + 4 * 6
    assert p.decode_reply(raw).num_examples == 17
    bad = {
        b"": "shorter than its header",
        b"XXXX" + raw[4:]: "not a DeComFL reply payload",
        raw[:4] + (9).to_bytes(2, "little") + raw[6:]: "schema version 9 is not supported",
        raw[:-1]: "its header announces",
        raw[:-4] + np.float32(np.nan).tobytes(): "NaN or Inf",
    }
    for blob, why in bad.items():
        with pytest.raises(ValueError, match=why):
            p.decode_reply(blob)
    with pytest.raises(ValueError, match="not a DeComFL sync payload"):
        p.decode_sync(raw)
    dup = p.encode_sync(sync)
    dup = (
        dup[: p.SYNC_HEADER.size]
        + dup[p.SYNC_HEADER.size + 4 : p.SYNC_HEADER.size + 8] * 2
        + dup[p.SYNC_HEADER.size + 8 :]
    )
    with pytest.raises(ValueError, match="repeats a seed index"):
        p.decode_sync(dup)


def test_round_seeds_are_keyed_distinct_and_leave_no_global_rng_trace(mods: Mods) -> None:
    a = mods.decomfl.round_seeds(42, 3, 64)
    assert a.dtype == np.uint32 and np.unique(a).size == 64 and int(a.max()) < 2**20
    np.testing.assert_array_equal(a, mods.decomfl.round_seeds(42, 3, 64))
    assert not np.array_equal(a, mods.decomfl.round_seeds(42, 4, 64))
    assert not np.array_equal(a, mods.decomfl.round_seeds(43, 3, 64))


def test_server_validates_every_reply_before_it_changes_state(mods: Mods) -> None:
    d, p = mods.server, mods.payload
    server = d.DeComFLServer(
        aggregator=create_aggregator("weighted-mean"),
        fingerprint="0" * 64,
        run_seed=7,
        num_local_steps=2,
        num_perturbations=2,
        batch_size=1,
        eps=1e-3,
        lr_at=lambda r: 0.1,
    )
    payloads = server.configure(1, [0, 1])
    sent = p.decode_sync(payloads[0])
    assert sent.base_round == 0 and sent.entries == () and sent.seeds.size == 4
    good = p.encode_reply(p.ReplyPayload(1, 0, 10, 0, 1.0, 1.0, np.array([1, 2, 3, 4], np.float32)))
    replies = [NodeReply(0, payload=good), NodeReply(1, payload=b"garbage")]
    before = server.state_dict()
    out = server.aggregate(1, replies, min_replies=2)
    assert not out.applied and out.accepted == (0,) and "malformed payload" in out.rejected[0].reason
    after = server.state_dict()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)  # type: ignore[arg-type]
    out = server.aggregate(1, replies, min_replies=1)
    assert out.applied and out.accepted == (0,)
    assert [e.server_round for e in server.history] == [1] and server.node_versions == {0: 0}
    np.testing.assert_array_equal(server.history[0].scalars, [1, 2, 3, 4])
    np.testing.assert_array_equal(server.history[0].seeds, sent.seeds)
    # round 2: node 0 continues from version 0 with round 1's entry; a stale node is resent from
    # what it says it holds (here nothing: from theta_0)
    sync2 = p.decode_sync(server.configure(2, [0, 1])[0])
    assert sync2.base_round == 0 and [e.server_round for e in sync2.entries] == [1]
    stale = NodeReply(1, error=ClientErrorPayload(2, ErrorCode.STALE_SYNC, "holds nothing", None))
    reply2 = p.encode_reply(p.ReplyPayload(2, 1, 10, 0, 1.0, 1.0, np.ones(4, np.float32)))
    out = server.aggregate(2, [NodeReply(0, payload=reply2), stale], min_replies=1)
    assert out.applied and "STALE_SYNC" in out.rejected[0].reason and server.node_versions == {0: 1}
    with pytest.raises(ValueError, match=r"local steps, perturbations\) = \(0+, 7, 2, 1\)"):
        server.load_state_dict({**server.state_dict(), "num_perturbations": 1})


# -- the 4-round run ---------------------------------------------------------------------------


def test_end_to_end_trains_and_uploads_only_scalars(mods: Mods, scenario: Scenario) -> None:
    rounds = [r for r in scenario.rows if r["round"] >= 1]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and all(r["applied"] for r in rounds)
    assert [r["accepted"] for r in rounds] == [3, 3, 1, 3]
    assert scenario.summary["completed_rounds"] == 4
    losses = [r["heldout_loss"] for r in scenario.rows]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.01  # it learns
    for r in rounds:
        assert np.isfinite(r["train_loss"]) and r["train_loss"] > 0
        # Up: the fixed header plus one float32 per local step and perturbation, nothing more.
        assert r["payload_bytes_up"] == mods.payload.REPLY_HEADER.size + 4 * TAU
    params = sum(t.numel() for t in mods.replica.get_replica(scenario.cfg).stepper.tuned.tensors)
    assert params > 10**6 and rounds[0]["payload_bytes_up"] < 100
    # every client of a round got the same server-drawn seeds
    for rnd in (1, 2, 4):
        seeds = [scenario.syncs[(rnd, c)].seeds for c in range(3)]
        assert all(np.array_equal(seeds[0], s) for s in seeds)
        np.testing.assert_array_equal(seeds[0], mods.decomfl.round_seeds(scenario.cfg.run.seed, rnd, TAU))


def test_missed_rounds_catch_up_to_the_replayed_history(mods: Mods, scenario: Scenario) -> None:
    # Node 2 was offline in round 3: in round 4 it holds version 1 and gets rounds 2 and 3.
    sync = scenario.syncs[(4, 2)]
    assert sync.base_round == 1 and [e.server_round for e in sync.entries] == [2, 3]
    assert scenario.catch_up["held_version"] == 1
    assert scenario.replies[(4, 2)].payload is not None  # accepted (round 4 counted 3 replies)
    assert scenario.catch_up["replayed"] > 0
    # The global model of version 3, rebuilt by replaying the whole history from theta_0.
    server = restored_server(mods, scenario)
    reference = mods.replica.SeedCoefficients()
    for entry in server.history:
        if entry.server_round <= 3:
            reference.add_entry(entry, 1)
    view = scenario.catch_up["view"]
    assert view.version == 3 and view.coefficients == reference  # bit-identical coefficients
    on_disk = next(scenario.state_root.glob(f"*/client-2/{mods.replica.VIEW_FILE}"))
    assert mods.replica.NodeView.load(on_disk).coefficients == reference
    fresh = mods.replica.build_replica(scenario.cfg)
    theta0 = torch.cat([t.detach().flatten().clone() for t in fresh.stepper.tuned.tensors])
    fresh.sync_to(reference)
    want = torch.cat([t.detach().flatten() for t in fresh.stepper.tuned.tensors]).double()
    got = torch.cat([t.flatten() for t in scenario.catch_up["model"]]).double()
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-6, rel
    assert float((want - theta0.double()).norm() / want.norm()) > 1e-3  # the history moved the model


def test_stale_client_gets_typed_error_then_recovers(scenario: Scenario) -> None:
    # Node 1's state vanished before round 3: the server sent "from version 1", it held nothing.
    assert scenario.syncs.get((3, 1)) is not None and scenario.syncs[(3, 1)].base_round == 1
    err = scenario.replies[(3, 1)].error
    assert err is not None and err.code == ErrorCode.STALE_SYNC and err.held_version is None
    row3 = next(r for r in scenario.rows if r["round"] == 3)
    assert row3["stale_nodes"] == 1 and "1: client error STALE_SYNC" in row3["rejections"]
    # Round 4: the server resends everything from theta_0 and node 1's reply counts again.
    sync = scenario.syncs[(4, 1)]
    assert sync.base_round == 0 and [e.server_round for e in sync.entries] == [1, 2, 3]
    assert scenario.replies[(4, 1)].payload is not None
    assert next(r for r in scenario.rows if r["round"] == 4)["accepted"] == 3


def test_checkpoint_round_trip(mods: Mods, scenario: Scenario) -> None:
    state = load_checkpoint(Path(str(scenario.summary["run_dir"]))).server_state
    server = restored_server(mods, scenario)
    again = server.state_dict()
    assert state.keys() == again.keys()
    for key, value in state.items():
        assert np.array_equal(np.asarray(value), np.asarray(again[key])), key
    assert [e.server_round for e in server.history] == [1, 2, 3, 4]
    assert server.node_versions == {0: 3, 1: 3, 2: 3}
    with pytest.raises(ValueError, match="state version"):
        server.load_state_dict({**state, "version": 99})


# -- the client's bookkeeping ------------------------------------------------------------------


def _flat(replica: Any) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in replica.stepper.tuned.tensors]).double()


def test_local_steps_keep_the_coefficients_exact(mods: Mods, tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.data.collate import encode_examples

    cfg = tiny_cfg(tiny_model_dir, tmp_path / "runs")
    replica = mods.replica.build_replica(cfg, keep_theta0=True)
    theta0 = _flat(replica).clone()
    batch = encode_examples(
        replica.tokenizer, ["Was the film good?", "Was the film bad?"], ["yes", "no"], max_length=48
    )
    seeds = mods.server.round_seeds(cfg.run.seed, 1, TAU * 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = replica.local_round(seeds, lr=1e-3, num_perturbations=2, batch_for_step=lambda t: batch)
    finally:
        torch.set_num_threads(threads)
    assert local.scalars.shape == (TAU * 2,) and local.num_skipped == 0 and np.isfinite(local.train_loss)
    # model = theta_0 + sum_s c_s z_s with c_s = -(lr / P) g_s for this round's seeds
    assert len(replica.coefficients) == TAU * 2
    for seed, g in zip(seeds.tolist(), local.scalars.tolist(), strict=True):
        assert replica.coefficients.get(seed) == pytest.approx(-(1e-3 / 2) * g, rel=1e-6)
    trained = _flat(replica)
    fresh = mods.replica.build_replica(cfg)
    fresh.sync_to(replica.coefficients)
    assert float((trained - _flat(fresh)).norm() / trained.norm()) < 1e-6
    moved = float((trained - theta0).norm())
    assert moved / float(theta0.norm()) > 1e-4
    # undoing the local steps is one replay of -c (float32 rounding aside); rebuilding restores
    # theta_0 and replays, bit for bit what a fresh replica gets
    replica.sync_to(mods.replica.SeedCoefficients())
    assert float((_flat(replica) - theta0).norm() / theta0.norm()) < 1e-6
    replica.sync_to(fresh.coefficients, rebuild=True)
    assert torch.equal(_flat(replica), _flat(fresh))


# -- the API's conformance checks; P > 1 end to end, stopped and resumed ------------------------


def test_passes_the_algorithm_conformance_checks(mods: Mods, tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedtune.runtime.conformance import check_algorithm

    mods.replica.clear_replicas()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_algorithm(tiny_cfg(tiny_model_dir, tmp_path / "runs"), tmp_path / "work")
    finally:
        torch.set_num_threads(threads)
        mods.replica.clear_replicas()


def test_several_perturbations_stop_and_resume_equals_no_stop_with_rebuild(
    mods: Mods, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(
        tiny_model_dir,
        tmp_path / "runs",
        **{
            "algorithm.options.num-perturbations": 2,
            "algorithm.options.rebuild-each-round": True,
            "federation.num-rounds": 2,
        },
    )
    mods.replica.clear_replicas()
    full, rows = run_tiny(cfg, run_dir=tmp_path / "full", state_dir=tmp_path / "state-full")
    assert full["completed_rounds"] == 2
    for r in rows[1:]:
        assert r["applied"] and r["accepted"] == 3 and np.isfinite(r["train_loss"])
        assert r["payload_bytes_up"] == mods.payload.REPLY_HEADER.size + 4 * TAU * 2
    mods.replica.clear_replicas()  # a fresh process
    run_tiny(cfg, run_dir=tmp_path / "resumed", state_dir=tmp_path / "state", stop_after=1)
    mods.replica.clear_replicas()
    run_tiny(cfg, run_dir=tmp_path / "resumed", state_dir=tmp_path / "state", resume=True)
    mods.replica.clear_replicas()
    a = load_checkpoint(tmp_path / "full").server_state
    b = load_checkpoint(tmp_path / "resumed").server_state
    assert a.keys() == b.keys()
    for key, value in a.items():  # bit-identical: each round starts from rebuild(history)
        assert np.array_equal(np.asarray(value), np.asarray(b[key])), key
    assert np.asarray(a["history.scalars"]).shape == (2, TAU * 2)


def test_docs_show_the_client_half_verbatim() -> None:
    doc = (REPO_ROOT / "docs" / "algorithms.md").read_text()
    source = (REPO_ROOT / "examples" / "decomfl" / "decomfl.py").read_text()
    block = doc.split("The client half, verbatim from `examples/decomfl/decomfl.py`:\n\n```python\n", 1)[1]
    block = block.split("\n```", 1)[0]
    assert "def train(self, payload: bytes, node: NodeContext) -> bytes:" in block
    assert block in source
