"""End to end: the secure sum equals the plain sum of the survivors, through dropouts, aborts and misuse."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from fedtune.secagg import (
    KeysBroadcast,
    KeysReply,
    MaskRequest,
    SecAggAbort,
    SecAggClient,
    SecAggError,
    SecAggStageError,
    ShareDecryptionError,
    UnmaskRequest,
)

from .harness import STAGES, RoundResult, make_server, node_ids, run_round


def _check_sum(result: RoundResult) -> None:
    n = len(result.server.setup.participants)
    err = np.abs(result.total - result.expected).max()
    assert err <= result.server.setup.quantizer().max_sum_error(n)


@pytest.mark.parametrize("n", [3, 5, 10])
def test_secure_sum_equals_plain_sum(n: int) -> None:
    result = run_round(n, seed=n)
    assert result.server.survivors == tuple(node_ids(n))
    assert result.server.rejected == {}
    _check_sum(result)


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("stage", STAGES)
def test_one_dropout_before_each_stage(n: int, stage: str) -> None:
    dropped = node_ids(n)[1]
    result = run_round(n, drops={stage: {dropped}}, seed=7)
    # a node that drops only before unmasking already sent its masked input: it stays in the sum
    assert (dropped in result.server.survivors) == (stage == "unmask")
    _check_sum(result)


@pytest.mark.parametrize("n", [5, 10])
def test_dropouts_spread_over_every_stage_up_to_n_minus_t(n: int) -> None:
    t = max(2, (2 * n + 2) // 3)
    nodes = node_ids(n)
    budget = n - t
    cases = [
        {s: {nodes[i]} for i, s in zip(range(budget), STAGES, strict=False)},  # one per stage
        {"masked": set(nodes[:budget])},  # every loss at the costliest stage for the server
        {"shares": {nodes[0]}, "unmask": set(nodes[1:budget])},
    ]
    for seed, drops in enumerate(cases):
        assert sum(len(v) for v in drops.values()) <= budget
        _check_sum(run_round(n, threshold=t, drops=drops, seed=seed))


@pytest.mark.parametrize("stage", STAGES)
def test_abort_when_fewer_than_t_remain(stage: str) -> None:
    nodes = node_ids(5)
    with pytest.raises(SecAggAbort, match="below threshold 4") as info:
        run_round(5, threshold=4, drops={stage: set(nodes[:2])}, length=64)
    assert "only 3 valid replies" in info.value.reason


def test_server_refuses_any_call_after_an_abort() -> None:
    server = make_server(node_ids(3), 3, 8)
    with pytest.raises(SecAggAbort):
        server.collect_keys([])
    with pytest.raises(SecAggStageError):
        server.collect_keys([])


def test_server_stages_out_of_order() -> None:
    server = make_server(node_ids(3), 2, 8)
    with pytest.raises(SecAggStageError, match="collect_masked"):
        server.collect_masked([])
    with pytest.raises(SecAggStageError):
        server.collect_unmask([])
    with pytest.raises(SecAggStageError, match="survivors"):
        _ = server.survivors


def test_client_stages_out_of_order() -> None:
    nodes = node_ids(3)
    server = make_server(nodes, 2, 8)
    client = SecAggClient()
    with pytest.raises(SecAggStageError, match="handle_mask"):
        client.handle_mask(MaskRequest(tuple(nodes), ()), np.zeros(8))
    with pytest.raises(SecAggStageError):
        client.handle_keys(KeysBroadcast(()))
    client.handle_setup(server.setup, nodes[0])
    with pytest.raises(SecAggStageError, match="handle_setup"):
        client.handle_setup(server.setup, nodes[0])
    with pytest.raises(SecAggStageError, match="handle_unmask"):
        client.handle_unmask(UnmaskRequest(tuple(nodes), ()))


def test_client_refuses_a_setup_for_another_node() -> None:
    server = make_server(node_ids(3), 2, 8)
    with pytest.raises(SecAggError, match="not among the round's participants"):
        SecAggClient().handle_setup(server.setup, 5)


def test_duplicate_and_foreign_replies_are_rejected_not_fatal() -> None:
    nodes = node_ids(4)
    server = make_server(nodes, 3, 16)
    clients = {u: SecAggClient() for u in nodes}
    replies = [clients[u].handle_setup(server.setup, u) for u in nodes]
    stranger = KeysReply(4242, replies[0].s_public[::-1], replies[0].c_public[::-1])
    bcast = server.collect_keys([*replies, replies[1], stranger])  # identical duplicate + non-participant
    assert set(bcast) == set(nodes)
    assert "duplicate" in server.rejected[nodes[1]]
    assert "not expected" in server.rejected[4242]


def test_conflicting_duplicates_drop_the_node() -> None:
    nodes = node_ids(4)
    server = make_server(nodes, 3, 16)
    clients = {u: SecAggClient() for u in nodes}
    replies = [clients[u].handle_setup(server.setup, u) for u in nodes]
    forged = dataclasses.replace(
        replies[2], s_public=SecAggClient().handle_setup(server.setup, nodes[2]).s_public
    )
    bcast = server.collect_keys([*replies, forged])
    assert set(bcast) == set(nodes) - {nodes[2]}
    assert "conflicting" in server.rejected[nodes[2]]


def test_reply_claiming_another_sender_and_bad_keys_are_rejected() -> None:
    nodes = node_ids(4)
    server = make_server(nodes, 2, 16)
    clients = {u: SecAggClient() for u in nodes}
    replies = {u: clients[u].handle_setup(server.setup, u) for u in nodes}
    replies[nodes[0]] = replies[nodes[1]]  # node 0's transport slot carries node 1's reply
    replies[nodes[2]] = dataclasses.replace(replies[nodes[2]], c_public=bytes(32))  # low-order key
    replies[nodes[3]] = dataclasses.replace(replies[nodes[3]], s_public=replies[nodes[1]].c_public)  # reused
    with pytest.raises(SecAggAbort):
        server.collect_keys(replies)
    assert "claims to be from node" in server.rejected[nodes[0]]
    assert "not a usable X25519 key" in server.rejected[nodes[2]]
    assert "also claimed" in server.rejected[nodes[3]] and "also claimed" in server.rejected[nodes[1]]


def test_incomplete_shares_reply_is_rejected() -> None:
    nodes = node_ids(4)
    server = make_server(nodes, 3, 16)
    clients = {u: SecAggClient() for u in nodes}
    bcast = server.collect_keys({u: clients[u].handle_setup(server.setup, u) for u in nodes})
    shares = {u: clients[u].handle_keys(b) for u, b in bcast.items()}
    short = shares[nodes[0]]
    shares[nodes[0]] = dataclasses.replace(short, ciphertexts=short.ciphertexts[1:])
    masks = server.collect_shares(shares)
    assert set(masks) == set(nodes[1:])
    assert "not to every other node" in server.rejected[nodes[0]]
    assert all(nodes[0] not in m.participants_u2 for m in masks.values())


def test_client_refuses_altered_key_broadcast() -> None:
    nodes = node_ids(3)
    server = make_server(nodes, 2, 16)
    clients = {u: SecAggClient() for u in nodes}
    bcast = server.collect_keys({u: clients[u].handle_setup(server.setup, u) for u in nodes})[nodes[0]]
    swapped = dataclasses.replace(bcast.keys[0], c_public=bcast.keys[1].c_public)
    with pytest.raises(SecAggError, match="alters node"):
        clients[nodes[0]].handle_keys(KeysBroadcast((swapped, *bcast.keys[1:])))
    repeated = dataclasses.replace(bcast.keys[2], c_public=bcast.keys[1].c_public)
    with pytest.raises(SecAggError, match="repeats a public key"):
        clients[nodes[1]].handle_keys(KeysBroadcast((*bcast.keys[:2], repeated)))


def _to_unmask(n: int = 4, t: int = 3) -> tuple[list[int], dict[int, SecAggClient], dict[int, UnmaskRequest]]:
    nodes = node_ids(n)
    server = make_server(nodes, t, 16)
    clients = {u: SecAggClient() for u in nodes}
    bcast = server.collect_keys({u: clients[u].handle_setup(server.setup, u) for u in nodes})
    masks = server.collect_shares({u: clients[u].handle_keys(b) for u, b in bcast.items()})
    sent = {u: clients[u].handle_mask(m, np.zeros(16)) for u, m in masks.items() if u != nodes[3]}
    return nodes, clients, server.collect_masked(sent)


def test_client_refuses_a_node_listed_as_survivor_and_dropped() -> None:
    nodes, clients, requests = _to_unmask()
    assert requests[nodes[0]] == UnmaskRequest(tuple(nodes[:3]), (nodes[3],))
    both = UnmaskRequest(tuple(nodes[:3]), (nodes[2], nodes[3]))
    with pytest.raises(SecAggError, match=rf"lists \[{nodes[2]}\] as both survivor and dropped"):
        clients[nodes[0]].handle_unmask(both)


@pytest.mark.parametrize(
    ("survivors", "dropped", "match"),
    [
        ((0, 1), (2, 3), "below threshold"),
        ((0, 1, 2), (), "partition U2"),  # node 3 vanished from both lists
        ((0, 1, 2), (3, 4), "partition U2"),  # a node outside U2
    ],
)
def test_client_refuses_inconsistent_unmask_requests(
    survivors: tuple[int, ...], dropped: tuple[int, ...], match: str
) -> None:
    nodes, clients, _ = _to_unmask()
    ids = [*nodes, 4242]
    req = UnmaskRequest(tuple(ids[i] for i in survivors), tuple(ids[i] for i in dropped))
    with pytest.raises(SecAggError, match=match):
        clients[nodes[0]].handle_unmask(req)


def test_forged_share_names_its_sender_at_unmask() -> None:
    nodes = node_ids(3)
    server = make_server(nodes, 2, 16)
    clients = {u: SecAggClient() for u in nodes}
    bcast = server.collect_keys({u: clients[u].handle_setup(server.setup, u) for u in nodes})
    masks = server.collect_shares({u: clients[u].handle_keys(b) for u, b in bcast.items()})
    mine = masks[nodes[0]]
    (v, ct), rest = mine.ciphertexts[0], mine.ciphertexts[1:]
    flipped = ct[:40] + bytes([ct[40] ^ 1]) + ct[41:]
    forged = MaskRequest(mine.participants_u2, ((v, flipped), *rest))
    clients[nodes[0]].handle_mask(forged, np.zeros(16))
    with pytest.raises(ShareDecryptionError, match=f"from node {v}"):
        clients[nodes[0]].handle_unmask(UnmaskRequest(tuple(nodes), ()))


def test_rounds_are_independent() -> None:
    """Same inputs, two rounds: each sums correctly, and a client's upload differs between rounds."""
    xs = {u: np.full(256, 0.25) for u in node_ids(3)}
    a = run_round(3, inputs=xs, length=256, server_round=1)
    b = run_round(3, inputs=xs, length=256, server_round=2)
    _check_sum(a)
    _check_sum(b)
    for u in xs:
        assert not np.array_equal(a.masked[u].masked, b.masked[u].masked)


def test_clipped_counts_reach_the_server() -> None:
    nodes = node_ids(3)
    xs = {u: np.array([0.0, 9.0, -9.0, 1.0]) for u in nodes}
    result = run_round(3, inputs=xs, length=4)
    assert result.server.clipped == 6
    np.testing.assert_allclose(result.total, [0.0, 24.0, -24.0, 3.0], atol=1e-9)


def test_every_pair_of_dropouts_for_n_5_t_3() -> None:
    nodes = node_ids(5)
    for (s1, s2), (i, j) in zip(
        itertools.product(STAGES, STAGES), itertools.cycle([(0, 1), (1, 4), (2, 3)]), strict=False
    ):
        drops: dict[str, set[int]] = {s1: {nodes[i]}}
        drops.setdefault(s2, set()).add(nodes[j])
        _check_sum(run_round(5, threshold=3, drops=drops, length=128, seed=i + j))
