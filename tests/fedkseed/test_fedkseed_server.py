"""FedKSeedServer: hand-computed accumulator, Pro formula, reply validation, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.aggregators import create_aggregator
from fedtune.fedkseed.pro import SeedImportance
from fedtune.fedkseed.server import FedKSeedServer, Rejection, RoundSettings, coefficients_from_steps
from fedtune.wire.codec import ReplyPayload, SparseDelta, encode_reply, probabilities_from_quantized

K = 16
FP = "fp-test"


def make_server(
    *, pro: bool = False, sparse: bool = False, aggregator: str = "weighted-mean"
) -> FedKSeedServer:
    return FedKSeedServer(
        num_seeds=K, aggregator=create_aggregator(aggregator), fingerprint=FP, pro=pro, sparse_sync=sparse
    )


def settings(rnd: int, lr: float = 0.1, steps: int = 3) -> RoundSettings:
    return RoundSettings(server_round=rnd, lr=lr, eps=1e-3, num_local_steps=steps, batch_size=2)


def reply(
    rnd: int,
    seeds: list[int],
    grads: list[float],
    *,
    n: int = 10,
    skipped: int = 0,
    fingerprint: str = FP,
    loss: float = 1.0,
    scalar_dtype: str = "float32",
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
    return encode_reply(payload, scalar_dtype=scalar_dtype)  # type: ignore[arg-type]


def test_accumulator_equals_hand_computed_values_over_two_rounds() -> None:
    # Prepare: three clients, weights 10/20/30 examples, lr 0.1 then 0.05.
    server = make_server()
    r1 = [
        (1, reply(1, [0, 1, 0], [1.0, 2.0, 3.0], n=10)),
        (2, reply(1, [1, 2, 3], [-1.0, 0.5, 4.0], n=20)),
        (3, reply(1, [5, 5, 5], [1.0, 1.0, 1.0], n=30)),
    ]
    # Execute
    out1 = server.aggregate_round(settings(1, lr=0.1), r1, expected_nodes={1, 2, 3}, min_replies=1)
    r2 = [(2, reply(2, [0, 4, 4], [2.0, 1.0, -3.0], n=20)), (3, reply(2, [1, 1, 1], [1.0, 1.0, 1.0], n=30))]
    out2 = server.aggregate_round(settings(2, lr=0.05), r2, expected_nodes={2, 3}, min_replies=1)
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
    assert out1.accepted == (1, 2, 3) and out2.seeds_touched == 3


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
    server.aggregate_round(
        settings(1),
        [(1, reply(1, [3, 3, 7], [2.0, 2.0, 0.1])), (9, reply(1, [0, 0, 0], [99.0, 99.0, 99.0]))],
        expected_nodes={1},
        min_replies=1,
    )
    sync = server.make_sync(1, settings(2))
    assert sync.quantized_probabilities is not None
    p = probabilities_from_quantized(sync.quantized_probabilities)
    assert int(np.argmax(p)) == 3  # node 9 was not sampled, so seed 0's 99s never counted
    assert p[7] > p[1]


@pytest.mark.parametrize(
    ("case", "make", "reason"),
    [
        ("wrong round", lambda: reply(7, [0, 1, 2], [1, 1, 1]), "reply is for round 7"),
        ("not sampled", None, "not sampled"),
        ("duplicate", None, "duplicate reply"),
        ("malformed bytes", lambda: b"\x00\xffgarbage", "malformed payload"),
        ("seed index out of range", None, "malformed payload"),
        ("fingerprint", lambda: reply(1, [0, 1, 2], [1, 1, 1], fingerprint="other"), "fingerprint"),
        ("too many steps", lambda: reply(1, [0, 1, 2, 3], [1, 1, 1, 1]), "at most 3"),
        ("steps do not add up", lambda: reply(1, [0, 1], [1, 1]), "!= 3 asked"),
        ("absurd example count", lambda: reply(1, [0, 1, 2], [1, 1, 1], n=10**12), "absurd num_examples"),
        ("zero example count", lambda: reply(1, [0, 1, 2], [1, 1, 1], n=0), "absurd num_examples"),
        ("coefficient overflow", lambda: reply(1, [0, 0, 0], [3e38, 3e38, 3e38]), "overflow"),
    ],
)
def test_invalid_replies_are_rejected_and_leave_state_untouched(case: str, make: object, reason: str) -> None:
    # Prepare: one good reply from node 1 plus the bad one.
    server = make_server()
    good = (1, reply(1, [4, 5, 6], [1.0, 1.0, 1.0]))
    if case == "not sampled":
        bad = (99, reply(1, [0, 1, 2], [1, 1, 1]))
    elif case == "duplicate":
        bad = (1, reply(1, [0, 1, 2], [5, 5, 5]))
    elif case == "seed index out of range":
        big = FedKSeedServer(num_seeds=2 * K, aggregator=create_aggregator("weighted-mean"), fingerprint=FP)
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
        del big
        bad = (2, encode_reply(payload))
    else:
        bad = (2, make())  # type: ignore[operator]
    before = make_server()
    before.aggregate_round(settings(1, lr=0.9), [good], expected_nodes={1, 2}, min_replies=1)
    # Execute
    out = server.aggregate_round(settings(1, lr=0.9), [good, bad], expected_nodes={1, 2}, min_replies=1)
    # Assert: the bad reply is rejected with its reason; state equals the good-only run.
    assert out.accepted == (1,)
    assert len(out.rejected) == 1 and reason in out.rejected[0].reason
    np.testing.assert_array_equal(server.accumulator, before.accumulator)


def test_round_below_min_replies_ends_cleanly_without_touching_state() -> None:
    server = make_server()
    out = server.aggregate_round(
        settings(1), [(1, reply(1, [0, 1, 2], [1, 1, 1]))], expected_nodes={1, 2}, min_replies=2
    )
    assert not out.applied and server.completed_round == 0
    assert not server.accumulator.any()


def test_validate_reply_returns_rejection_objects() -> None:
    server = make_server()
    res = server.validate_reply(5, b"", settings(1), expected_nodes={5}, seen=set())
    assert isinstance(res, Rejection) and res.node_id == 5


def test_sparse_sync_sends_only_what_changed_since_the_node_last_synced() -> None:
    server = make_server(sparse=True)
    first = server.make_sync(1, settings(1))
    # never synced: relative to zero, and in round 1 nothing is non-zero yet
    assert isinstance(first.accumulator, SparseDelta) and first.accumulator.base_round == 0
    assert first.accumulator.indices.size == 0
    server.aggregate_round(
        settings(1), [(1, reply(1, [2, 3, 3], [1, 1, 1]))], expected_nodes={1}, min_replies=1
    )
    second = server.make_sync(1, settings(2))
    assert isinstance(second.accumulator, SparseDelta) and second.accumulator.base_round == 1
    rebuilt = np.zeros(K)
    rebuilt[second.accumulator.indices.astype(int)] += second.accumulator.values
    np.testing.assert_allclose(rebuilt, server.accumulator, rtol=1e-6)
    # a forgotten node (it reported a stale base) gets the whole A relative to zero
    server.forget_node(1)
    third = server.make_sync(1, settings(3))
    assert isinstance(third.accumulator, SparseDelta) and third.accumulator.base_round == 0
    np.testing.assert_array_equal(third.accumulator.indices, np.flatnonzero(server.accumulator))
    np.testing.assert_allclose(
        third.accumulator.values, server.accumulator[third.accumulator.indices], rtol=1e-6
    )


def test_sparse_sync_falls_back_to_dense_when_the_delta_is_larger() -> None:
    server = make_server(sparse=True)
    touched = list(range(K))  # every seed non-zero: 6 B per entry loses to 4 B per seed
    server.make_sync(1, settings(1))
    server.aggregate_round(
        settings(1, steps=K), [(1, reply(1, touched, [1.0] * K))], expected_nodes={1}, min_replies=1
    )
    assert np.count_nonzero(server.accumulator) == K
    assert not isinstance(server.make_sync(2, settings(2)).accumulator, SparseDelta)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    server = make_server(pro=True, sparse=True)
    server.make_sync(1, settings(1))
    server.aggregate_round(
        settings(1), [(1, reply(1, [0, 3, 3], [1, -2, 0.5]))], expected_nodes={1}, min_replies=1
    )
    server.save(tmp_path)
    restored = make_server(pro=True, sparse=True)
    restored.load(tmp_path)
    np.testing.assert_array_equal(restored.accumulator, server.accumulator)
    np.testing.assert_array_equal(restored.importance.probabilities(), server.importance.probabilities())
    assert restored.completed_round == 1 and restored.node_versions == {1: 1}
    a, b = server.make_sync(1, settings(2)), restored.make_sync(1, settings(2))
    assert a == b
    other = FedKSeedServer(
        num_seeds=K, aggregator=create_aggregator("weighted-mean"), fingerprint="different"
    )
    with pytest.raises(ValueError, match="same model and config"):
        other.load(tmp_path)


def test_coefficients_fold_the_learning_rate() -> None:
    c = coefficients_from_steps(np.array([1, 1, 2]), np.array([1.0, 2.0, -1.0]), lr=0.5, num_seeds=4)
    np.testing.assert_allclose(c, [0.0, -1.5, 0.5, 0.0])
