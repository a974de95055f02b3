"""Conformance checks every algorithm should pass, for fedtune's tests and for your own.

``check_algorithm(cfg, workdir)`` runs each ``check_*`` on the algorithm ``cfg.run.algorithm``
names, at whatever (tiny) scale ``cfg`` sets, with no Flower: payloads go straight to in-process
clients through the same client glue the ClientApp uses. Each check raises ``AssertionError``
naming the broken property. A check builds fresh server halves, so process-cached models must
not carry state that the server state does not describe.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path

import numpy as np

from fedtune.aggregators import create_aggregator
from fedtune.aggregators.base import StateValue
from fedtune.algorithms.base import NodeReply, ServerAlgorithm
from fedtune.algorithms.registry import create_algorithm
from fedtune.config import RunConfig
from fedtune.runtime.direct import DirectTransport
from fedtune.runtime.node import NodeConfig
from fedtune.runtime.transport import RoundRequest
from fedtune.wire.errors import ClientErrorPayload, ErrorCode


def _server(cfg: RunConfig) -> ServerAlgorithm:
    return create_algorithm(cfg).server(create_aggregator(cfg.aggregator.name, dict(cfg.aggregator.options)))


def _same_state(a: Mapping[str, StateValue], b: Mapping[str, StateValue], what: str) -> None:
    if a.keys() != b.keys():
        raise AssertionError(f"{what}: state keys differ: {sorted(a.keys() ^ b.keys())}")
    for key, value in a.items():
        other = b[key]
        if isinstance(value, np.ndarray) or isinstance(other, np.ndarray):
            if not (
                isinstance(value, np.ndarray)
                and isinstance(other, np.ndarray)
                and value.dtype == other.dtype
                and np.array_equal(value, other)
            ):
                raise AssertionError(f"{what}: state array {key!r} differs")
        elif value != other:
            raise AssertionError(f"{what}: state value {key!r} differs: {value!r} != {other!r}")


def _replies(
    cfg: RunConfig,
    workdir: Path,
    server_round: int,
    payloads: Mapping[int, bytes],
    state: str = "client-state",
) -> list[NodeReply]:
    nodes: list[NodeConfig] = [{"partition-id": c, "state-dir": str(workdir / state)} for c in payloads]
    transport = DirectTransport(cfg, nodes)
    return transport.exchange(RoundRequest(server_round, payloads, "conformance", 60.0)).replies


def check_one_round_applies(cfg: RunConfig, workdir: Path) -> None:
    """Honest clients: round 1 is applied, accepts every reply and changes the state."""
    with closing(_server(cfg)) as server:
        _one_round_applies(cfg, workdir, server)


def _one_round_applies(cfg: RunConfig, workdir: Path, server: ServerAlgorithm) -> None:
    before = server.state_dict()
    clients = list(range(cfg.federation.clients_per_round))
    payloads = server.configure(1, clients)
    if sorted(payloads) != clients:
        raise AssertionError(f"configure() addressed {sorted(payloads)}, sampled {clients}")
    out = server.aggregate(1, _replies(cfg, workdir, 1, payloads), min_replies=1)
    if not out.applied or sorted(out.accepted) != clients or out.rejected:
        raise AssertionError(f"honest round not applied cleanly: {out}")
    try:
        _same_state(before, server.state_dict(), "after an applied round")
    except AssertionError:
        return
    raise AssertionError("an applied round left the server state unchanged")


def check_rejections_leave_state_untouched(cfg: RunConfig, workdir: Path) -> None:
    """Garbage, client errors, unsampled and duplicate replies are rejected and change nothing."""
    with closing(_server(cfg)) as server:
        _rejections_leave_state_untouched(server)


def _rejections_leave_state_untouched(server: ServerAlgorithm) -> None:
    before = server.state_dict()
    server.configure(1, [0, 1])
    error = ClientErrorPayload(1, ErrorCode.CLIENT_EXCEPTION, "RuntimeError: conformance")
    bad = [
        NodeReply(0, payload=b"\x08\x99not a payload"),
        NodeReply(1, error=error),
        NodeReply(7, payload=b"from a node nobody sampled"),
        NodeReply(0, payload=b"duplicate"),
    ]
    out = server.aggregate(1, bad, min_replies=1)
    if out.applied or out.accepted or len(out.rejected) != len(bad):
        raise AssertionError(f"bad replies were not all rejected: {out}")
    if not any("CLIENT_EXCEPTION" in r.reason for r in out.rejected):
        raise AssertionError("a client error reply is not recorded as a rejection with its code")
    _same_state(before, server.state_dict(), "after a round of rejected replies")


def check_state_round_trip(cfg: RunConfig, workdir: Path) -> None:
    """``load_state_dict(state_dict())`` on a fresh server gives the same state, and then the same
    round-2 payloads; for a server whose payloads carry per-round secrets
    (``deterministic_payloads = False``, e.g. split-and-privatize's tokens), the same state after
    running round 2 on both."""
    with closing(_server(cfg)) as server, closing(_server(cfg)) as restored:
        clients = list(range(cfg.federation.clients_per_round))
        payloads = server.configure(1, clients)
        server.aggregate(1, _replies(cfg, workdir, 1, payloads), min_replies=1)
        restored.load_state_dict(server.state_dict())
        _same_state(server.state_dict(), restored.state_dict(), "after load_state_dict")
        if server.deterministic_payloads:
            if server.configure(2, clients) != restored.configure(2, clients):
                raise AssertionError("a restored server sends different round-2 payloads")
            return
        twin = workdir / "client-state-twin"  # the restored server's clients hold the same node state
        if (workdir / "client-state").exists():
            shutil.copytree(workdir / "client-state", twin, dirs_exist_ok=True)
        for srv, state in ((server, "client-state"), (restored, twin.name)):
            out = srv.aggregate(2, _replies(cfg, workdir, 2, srv.configure(2, clients), state), min_replies=1)
            if not out.applied:
                raise AssertionError(f"round 2 after a restore was not applied: {out}")
        _same_state(server.state_dict(), restored.state_dict(), "after a round on the restored server")


def check_algorithm(cfg: RunConfig, workdir: Path) -> None:
    """Run every check; ``workdir`` holds per-check client state."""
    for check in (check_one_round_applies, check_rejections_leave_state_untouched, check_state_round_trip):
        sub = workdir / check.__name__
        sub.mkdir(parents=True, exist_ok=True)
        check(cfg, sub)
