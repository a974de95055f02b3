"""A client kept on disk between stages (to_bytes/from_bytes) behaves exactly like one kept in memory."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune._proto.v1 import secagg_pb2 as pb
from fedtune.secagg import SecAggClient, SecAggPayloadError

from .harness import make_server, node_ids, run_round


def test_persisted_clients_complete_the_protocol() -> None:
    result = run_round(5, persist=True, drops={"unmask": {node_ids(5)[4]}}, seed=3)
    err = np.abs(result.total - result.expected).max()
    assert err <= result.server.setup.quantizer().max_sum_error(5)


def test_restored_client_answers_identically_after_each_stage() -> None:
    nodes = node_ids(3)
    server = make_server(nodes, 2, 64)
    clients = {u: SecAggClient() for u in nodes}
    fresh = SecAggClient()
    assert SecAggClient.from_bytes(fresh.to_bytes()).to_bytes() == fresh.to_bytes()

    def twin(u: int) -> SecAggClient:
        copy = SecAggClient.from_bytes(clients[u].to_bytes())
        assert copy.to_bytes() == clients[u].to_bytes() and copy.node_id == clients[u].node_id
        return copy

    keys = {u: clients[u].handle_setup(server.setup, u) for u in nodes}
    bcast = server.collect_keys(keys)
    clients = {u: twin(u) for u in nodes}  # stage 2 draws randomness: go on with the restored clients
    shares = {u: clients[u].handle_keys(b) for u, b in bcast.items()}
    masks = server.collect_shares(shares)
    x = np.linspace(-1, 1, 64)
    masked = {}
    for u, m in masks.items():
        copy = twin(u)
        masked[u] = clients[u].handle_mask(m, x)
        assert copy.handle_mask(m, x) == masked[u]  # stage 3 is deterministic given the state
    unmask = server.collect_masked(masked)
    replies = {}
    for u, r in unmask.items():
        copy = twin(u)
        replies[u] = clients[u].handle_unmask(r)
        assert copy.handle_unmask(r) == replies[u]
        assert clients[u].done
    np.testing.assert_allclose(server.collect_unmask(replies), 3 * x, atol=1e-9)


def test_keys_were_dropped_once_done() -> None:
    result = run_round(3, length=8)
    for client in result.clients.values():
        restored = SecAggClient.from_bytes(client.to_bytes())
        assert restored.done
        state = pb.SecAggClientState.FromString(client.to_bytes())
        assert state.c_private == state.s_private == state.self_mask_seed == state.own_s_share == b""
        assert not state.HasField("setup") and not state.ciphertexts


def test_corrupt_state_is_refused() -> None:
    nodes = node_ids(3)
    client = SecAggClient()
    client.handle_setup(make_server(nodes, 2, 8).setup, nodes[0])
    state = pb.SecAggClientState.FromString(client.to_bytes())
    with pytest.raises(SecAggPayloadError, match="malformed"):
        SecAggClient.from_bytes(b"\x0a\xff")
    with pytest.raises(SecAggPayloadError, match="schema_version"):
        SecAggClient.from_bytes(b"")
    state.c_private = state.c_private[:31]
    with pytest.raises(SecAggPayloadError, match="c_private is 31 bytes"):
        SecAggClient.from_bytes(state.SerializeToString())
    state.stage = 42
    with pytest.raises(SecAggPayloadError, match="42"):
        SecAggClient.from_bytes(state.SerializeToString())
