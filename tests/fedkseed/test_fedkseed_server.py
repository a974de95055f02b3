"""FedKSeedServer: hand-computed accumulator, Pro formula, reply validation, faults, state round trip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fedtune.aggregators import create_aggregator
from fedtune.algorithms.base import NodeReply
from fedtune.fedkseed.pro import SeedImportance
from fedtune.fedkseed.server import (
    SYNC_HISTORY_ROUNDS,
    FedKSeedServer,
    RoundSettings,
    coefficients_from_steps,
)
from fedtune.wire.codec import ReplyPayload, SparseDelta, encode_reply, probabilities_from_quantized
from fedtune.wire.errors import ClientErrorPayload, ErrorCode

K = 16
FP = "fp-test"
LRS: dict[int, float] = {}


def settings(rnd: int, steps: int = 3) -> RoundSettings:
    return RoundSettings(
        server_round=rnd, lr=LRS.get(rnd, 0.1), eps=1e-3, num_local_steps=steps, batch_size=2
    )


def make_server(
    *,
    pro: bool = False,
    sparse: bool = False,
    aggregator: str = "weighted-mean",
    options: dict[str, object] | None = None,
    steps: int = 3,
    fingerprint: str = FP,
) -> FedKSeedServer:
    return FedKSeedServer(
        num_seeds=K,
        aggregator=create_aggregator(aggregator, options),
        fingerprint=fingerprint,
        settings=lambda r: settings(r, steps),
        pro=pro,
        sparse_sync=sparse,
    )


def reply(
    rnd: int,
    seeds: list[int],
    grads: list[float],
    *,
    n: int = 10,
    skipped: int = 0,
    fingerprint: str = FP,
    loss: float = 1.0,
) -> bytes:
    payload = ReplyPayload(
        server_round=rnd,
        num_seeds=K,
        num_examples=n,
        seed_indices=np.asarray(seeds, dtype=np.int64),
        projected_grads=np.asarray(grads, dtype=np.float32),
        train_loss=loss,
        num_skipped_steps=skipped,
        peak_memory_mb=1.0,
        fingerprint=fingerprint,
    )
    return encode_reply(payload)


def run_round(
    server: FedKSeedServer,
    rnd: int,
    replies: Sequence[tuple[int, bytes] | NodeReply],
    *,
    sampled: Sequence[int] | None = None,
    min_replies: int = 1,
):  # type: ignore[no-untyped-def]
    node_replies = [r if isinstance(r, NodeReply) else NodeReply(r[0], payload=r[1]) for r in replies]
    server.configure(rnd, sampled if sampled is not None else sorted({r.node_id for r in node_replies}))
    return server.aggregate(rnd, node_replies, min_replies=min_replies)


def test_accumulator_equals_hand_computed_values_over_two_rounds() -> None:
    # Prepare: three clients, weights 10/20/30 examples, lr 0.1 then 0.05.
    server = make_server()
    LRS.update({1: 0.1, 2: 0.05})
    try:
        r1 = [
            (1, reply(1, [0, 1, 0], [1.0, 2.0, 3.0], n=10)),
            (2, reply(1, [1, 2, 3], [-1.0, 0.5, 4.0], n=20)),
            (3, reply(1, [5, 5, 5], [1.0, 1.0, 1.0], n=30)),
        ]
        # Execute
        out1 = run_round(server, 1, r1)
        r2 = [
            (2, reply(2, [0, 4, 4], [2.0, 1.0, -3.0], n=20)),
            (3, reply(2, [1, 1, 1], [1.0, 1.0, 1.0], n=30)),
        ]
        out2 = run_round(server, 2, r2)
    finally:
        LRS.clear()
    # Assert: A_s = sum_r sum_i w_i * sum_t (-lr_r * g) [s_t = s]
    w1 = np.array([10, 20, 30]) / 60
    expect = np.zeros(K)
    expect[0] += w1[0] * -0.1 * (1 + 3)
    expect[1] += w1[0] * -0.1 * 2 + w1[1] * -0.1 * -1
    expect[2] += w1[1] * -0.1 * 0.5
    expect[3] += w1[1] * -0.1 * 4
    expect[5] += w1[2] * -0.1 * 3
    w2 = np.array([20, 30]) / 50
    expect[0] += w2[0] * -0.05 * 2
    expect[4] += w2[0] * -0.05 * (1 - 3)
    expect[1] += w2[1] * -0.05 * 3
    np.testing.assert_allclose(server.accumulator, expect, rtol=1e-6, atol=1e-9)
    assert out1.applied and out2.applied and server.completed_round == 2
    assert out1.accepted == (1, 2, 3) and out2.metrics["seeds_touched"] == 3


def test_pro_probabilities_match_the_paper_formula() -> None:
    imp = SeedImportance(6, clip=5.0)
    imp.update(np.array([0, 0, 1, 2, 2]), np.array([1.0, -3.0, 10.0, 0.5, -0.5]))
    # History per seed starts with grad_initial=0: a_s = mean |clip(h)|
    a = np.array([(0 + 1 + 3) / 3, (0 + 5) / 2, (0 + 0.5 + 0.5) / 3, 0, 0, 0])
    norm = (a - a.min()) / (a.max() - a.min() + 1e-10)
    p = np.exp(norm) / np.exp(norm).sum()
    np.testing.assert_allclose(imp.probabilities(), p, rtol=1e-12)
    assert imp.probabilities().max() / imp.probabilities().min() <= np.e + 1e-9


def test_pro_server_sends_quantized_probabilities_from_accepted_replies_only() -> None:
    server = make_server(pro=True)
    run_round(
        server,
        1,
        [(1, reply(1, [3, 3, 7], [2.0, 2.0, 0.1])), (9, reply(1, [0, 0, 0], [99.0, 99.0, 99.0]))],
        sampled=[1],
    )
    sync = server.make_sync(1, settings(2))
    assert sync.quantized_probabilities is not None
    p = probabilities_from_quantized(sync.quantized_probabilities)
    assert int(np.argmax(p)) == 3  # node 9 was not sampled, so seed 0's 99s never counted
    assert p[7] > p[1]


def test_pro_learns_only_from_the_updates_the_aggregator_kept() -> None:
    # Krum keeps one of three close updates; the outlier (node 3, seed 9) must leave no trace.
    server = make_server(pro=True, aggregator="krum")
    out = run_round(
        server,
        1,
        [
            (1, reply(1, [2, 2, 2], [1.0, 1.0, 1.0])),
            (2, reply(1, [2, 2, 2], [1.1, 1.1, 1.1])),
            (3, reply(1, [9, 9, 9], [500.0, 500.0, 500.0])),
        ],
    )
    assert out.applied
    assert server.importance.count[9] == 1  # only the initial history entry
    assert server.importance.count[2] == 4  # one kept update of 3 steps


@pytest.mark.parametrize(
    ("case", "make", "reason"),
    [
        ("wrong round", lambda: reply(7, [0, 1, 2], [1, 1, 1]), "reply is for round 7"),
        ("not sampled", None, "not sampled"),
        ("duplicate", None, "duplicate reply"),
        ("malformed bytes", lambda: b"\x00\xffgarbage", "malformed payload"),
        ("seed index out of range", None, "malformed payload"),
        ("fingerprint", lambda: reply(1, [0, 1, 2], [1, 1, 1], fingerprint="other"), "fingerprint"),
        ("too many steps", lambda: reply(1, [0, 1, 2, 3], [1, 1, 1, 1]), "!= 3 asked"),
        ("steps do not add up", lambda: reply(1, [0, 1], [1, 1]), "!= 3 asked"),
        ("absurd example count", lambda: reply(1, [0, 1, 2], [1, 1, 1], n=10**12), "absurd num_examples"),
        ("zero example count", lambda: reply(1, [0, 1, 2], [1, 1, 1], n=0), "absurd num_examples"),
        ("coefficient overflow", lambda: reply(1, [0, 0, 0], [3e38, 3e38, 3e38]), "overflow"),
        ("client error", None, "client error CLIENT_EXCEPTION"),
    ],
)
def test_invalid_replies_are_rejected_and_leave_state_untouched(case: str, make: object, reason: str) -> None:
    # Prepare: one good reply from node 1 plus the bad one.
    server = make_server()
    good = (1, reply(1, [4, 5, 6], [1.0, 1.0, 1.0]))
    bad: tuple[int, bytes] | NodeReply
    if case == "not sampled":
        bad = (99, reply(1, [0, 1, 2], [1, 1, 1]))
    elif case == "duplicate":
        bad = (1, reply(1, [0, 1, 2], [5, 5, 5]))
    elif case == "seed index out of range":
        payload = ReplyPayload(
            server_round=1,
            num_seeds=2 * K,
            num_examples=1,
            seed_indices=np.array([0, 1, K + 3]),
            projected_grads=np.ones(3, np.float32),
            train_loss=1.0,
            num_skipped_steps=0,
            peak_memory_mb=0.0,
            fingerprint=FP,
        )
        bad = (2, encode_reply(payload))
    elif case == "client error":
        bad = NodeReply(2, error=ClientErrorPayload(1, ErrorCode.CLIENT_EXCEPTION, "RuntimeError: boom"))
    else:
        bad = (2, make())  # type: ignore[operator]
    before = make_server()
    LRS[1] = 0.9  # large enough that three 3e38 scalars overflow float32
    try:
        run_round(before, 1, [good], sampled=[1, 2])
        # Execute
        out = run_round(server, 1, [good, bad], sampled=[1, 2])
    finally:
        LRS.clear()
    # Assert: the bad reply is rejected with its reason; state equals the good-only run.
    assert out.accepted == (1,)
    assert len(out.rejected) == 1 and reason in out.rejected[0].reason
    np.testing.assert_array_equal(server.accumulator, before.accumulator)


def test_round_below_min_replies_is_skipped_without_touching_state() -> None:
    server = make_server()
    out = run_round(server, 1, [(1, reply(1, [0, 1, 2], [1, 1, 1]))], sampled=[1, 2], min_replies=2)
    assert not out.applied and server.completed_round == 0 and "fewer than the 2 needed" in out.note
    assert not server.accumulator.any()


def test_aggregator_minimum_is_checked_after_rejections() -> None:
    # Krum needs 3 updates; one of three replies is broken, so the round is skipped, not raised.
    server = make_server(aggregator="krum")
    out = run_round(
        server,
        1,
        [(1, reply(1, [0, 1, 2], [1, 1, 1])), (2, reply(1, [0, 1, 2], [1, 1, 1])), (3, b"junk")],
    )
    assert not out.applied and len(out.rejected) == 1
    assert "3 needed" in out.note
    assert not server.accumulator.any() and server.completed_round == 0


def test_one_client_claiming_a_billion_examples_cannot_own_the_mean() -> None:
    honest = [(n, reply(1, [n, n, n], [1.0, 1.0, 1.0], n=100)) for n in (1, 2, 3)]
    liar = (4, reply(1, [9, 9, 9], [1.0, 1.0, 1.0], n=10**9))
    server = make_server()
    run_round(server, 1, [*honest, liar])
    # The liar's weight is capped at 10x the median claim (100): at most 1000 of 1300.
    liar_share = server.accumulator[9] / (-0.1 * 3)
    honest_share = server.accumulator[1] / (-0.1 * 3)
    assert liar_share == pytest.approx(1000 / 1300) and honest_share == pytest.approx(100 / 1300)


def test_a_node_counts_as_synced_only_once_its_reply_is_accepted() -> None:
    server = make_server(sparse=True)
    server.configure(1, [1, 2])
    assert server.node_versions == {}  # sending is not confirming
    out = server.aggregate(
        1,
        [
            NodeReply(1, payload=reply(1, [2, 3, 3], [1, 1, 1])),
            NodeReply(2, error=ClientErrorPayload(1, ErrorCode.CLIENT_EXCEPTION, "crashed")),
        ],
        min_replies=1,
    )
    assert out.applied and server.node_versions == {1: 1}
    second = server.make_sync(2, settings(2))  # node 2 never confirmed: A relative to zero
    assert isinstance(second.accumulator, SparseDelta) and second.accumulator.base_round == 0


def test_stale_sync_error_resends_from_the_version_the_node_holds() -> None:
    server = make_server(sparse=True)
    run_round(server, 1, [(1, reply(1, [2, 3, 3], [1, 1, 1]))])
    run_round(server, 2, [(1, reply(2, [5, 5, 5], [1, 1, 1]))])
    assert server.node_versions[1] == 2
    # Round 3: the node lost its round-2 view but says it holds round 1's.
    stale = ClientErrorPayload(3, ErrorCode.STALE_SYNC, "holds round 1", held_version=1)
    server.configure(3, [1])
    out = server.aggregate(3, [NodeReply(1, error=stale)], min_replies=1)
    assert not out.applied and "STALE_SYNC" in out.rejected[0].reason
    sync = server.make_sync(1, settings(4))
    assert isinstance(sync.accumulator, SparseDelta) and sync.accumulator.base_round == 1
    # A node holding nothing is resent A from zero.
    server.configure(4, [1])
    server.aggregate(
        4, [NodeReply(1, error=ClientErrorPayload(4, ErrorCode.STALE_SYNC, "empty"))], min_replies=1
    )
    assert server.make_sync(1, settings(5)).accumulator.base_round == 0  # type: ignore[union-attr]


def test_sparse_sync_sends_only_what_changed_since_the_node_last_synced() -> None:
    server = make_server(sparse=True)
    first = server.make_sync(1, settings(1))
    # never synced: relative to zero, and in round 1 nothing is non-zero yet
    assert isinstance(first.accumulator, SparseDelta) and first.accumulator.base_round == 0
    assert first.accumulator.indices.size == 0
    run_round(server, 1, [(1, reply(1, [2, 3, 3], [1, 1, 1]))])
    second = server.make_sync(1, settings(2))
    assert isinstance(second.accumulator, SparseDelta) and second.accumulator.base_round == 1
    rebuilt = np.zeros(K)
    rebuilt[second.accumulator.indices.astype(int)] += second.accumulator.values
    np.testing.assert_allclose(rebuilt, server.accumulator, rtol=1e-6)
    server.forget_node(1)
    third = server.make_sync(1, settings(3))
    assert isinstance(third.accumulator, SparseDelta) and third.accumulator.base_round == 0
    np.testing.assert_array_equal(third.accumulator.indices, np.flatnonzero(server.accumulator))


def test_sync_history_stays_bounded_and_old_nodes_resync_from_zero() -> None:
    # Node 1 replies every round, node 2 only in round 1: after SYNC_HISTORY_ROUNDS more rounds node 2
    # is forgotten and the history no longer grows with the rounds.
    server = make_server(sparse=True)
    rounds = SYNC_HISTORY_ROUNDS + 20
    run_round(server, 1, [(1, reply(1, [0, 1, 2], [1, 1, 1])), (2, reply(1, [3, 4, 5], [1, 1, 1]))])
    for rnd in range(2, rounds + 1):
        run_round(server, rnd, [(1, reply(rnd, [rnd % K, 1, 2], [1, 1, 1]))])
        assert len(server.round_deltas) <= SYNC_HISTORY_ROUNDS
    assert 2 not in server.node_versions and len(server.round_deltas) == 1
    stale = server.make_sync(2, settings(rounds + 1)).accumulator  # every seed touched: sent dense
    assert not isinstance(stale, SparseDelta)
    np.testing.assert_array_equal(stale, server.accumulator.astype(np.float32))
    fresh = server.make_sync(1, settings(rounds + 1)).accumulator
    assert isinstance(fresh, SparseDelta) and fresh.base_round == rounds


def test_sparse_sync_falls_back_to_dense_when_the_delta_is_larger() -> None:
    server = make_server(sparse=True, steps=K)
    touched = list(range(K))  # every seed non-zero: 6 B per entry loses to 4 B per seed
    run_round(server, 1, [(1, reply(1, touched, [1.0] * K))])
    assert np.count_nonzero(server.accumulator) == K
    assert not isinstance(server.make_sync(2, settings(2)).accumulator, SparseDelta)


def test_state_dict_round_trip() -> None:
    server = make_server(pro=True, sparse=True)
    run_round(server, 1, [(1, reply(1, [0, 3, 3], [1, -2, 0.5]))])
    restored = make_server(pro=True, sparse=True)
    restored.load_state_dict(server.state_dict())
    np.testing.assert_array_equal(restored.accumulator, server.accumulator)
    np.testing.assert_array_equal(restored.importance.probabilities(), server.importance.probabilities())
    assert restored.completed_round == 1 and restored.node_versions == {1: 1}
    assert server.make_sync(1, settings(2)) == restored.make_sync(1, settings(2))
    other = make_server(fingerprint="different")
    with pytest.raises(ValueError, match="same model and config"):
        other.load_state_dict(server.state_dict())
    broken = dict(server.state_dict(), accumulator=np.full(K, np.nan))
    with pytest.raises(ValueError, match="corrupt"):
        restored.load_state_dict(broken)
    np.testing.assert_array_equal(restored.accumulator, server.accumulator)  # untouched on failure


def test_coefficients_fold_the_learning_rate() -> None:
    c = coefficients_from_steps(np.array([1, 1, 2]), np.array([1.0, 2.0, -1.0]), lr=0.5, num_seeds=4)
    np.testing.assert_allclose(c, [0.0, -1.5, 0.5, 0.0])
