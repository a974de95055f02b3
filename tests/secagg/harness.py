"""An in-memory secure-aggregation round, with clients dropping out before any stage."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedtune.secagg import MaskedInput, SecAggClient, SecAggServer

STAGES = ("keys", "shares", "masked", "unmask")  # a client dropped at a stage sends no reply from there on


@dataclass
class RoundResult:
    server: SecAggServer
    clients: dict[int, SecAggClient]
    inputs: dict[int, npt.NDArray[np.float64]]
    total: npt.NDArray[np.float64]
    masked: dict[int, MaskedInput] = field(default_factory=dict)

    @property
    def expected(self) -> npt.NDArray[np.float64]:
        out: npt.NDArray[np.float64] = np.sum([self.inputs[u] for u in self.server.survivors], axis=0)
        return out


def node_ids(n: int) -> list[int]:
    """Sparse, unordered-looking ids so the Shamir points (index + 1) differ from the ids."""
    return [1000 + 37 * i for i in range(n)]


def make_server(
    nodes: list[int], threshold: int, length: int, *, run_key: str = "run", server_round: int = 1
) -> SecAggServer:
    return SecAggServer(
        run_key=run_key,
        server_round=server_round,
        participants=nodes,
        threshold=threshold,
        vector_length=length,
        fraction_bits=40,
        clip=8.0,
    )


def run_round(
    n: int,
    *,
    threshold: int | None = None,
    length: int = 1000,
    drops: Mapping[str, set[int]] | None = None,
    seed: int = 0,
    inputs: Mapping[int, npt.NDArray[np.float64]] | None = None,
    persist: bool = False,
    server_round: int = 1,
) -> RoundResult:
    """All stages in memory; ``drops[stage]`` are node ids that go silent before that stage's reply.

    ``persist`` round-trips every client through to_bytes/from_bytes between stages.
    """
    nodes = node_ids(n)
    t = threshold if threshold is not None else max(2, (2 * n + 2) // 3)
    server = make_server(nodes, t, length, server_round=server_round)
    rng = np.random.default_rng(seed)
    xs = dict(inputs) if inputs is not None else {u: rng.uniform(-1, 1, length) for u in nodes}
    clients = {u: SecAggClient() for u in nodes}
    gone: set[int] = set()

    def live(stage: str) -> Callable[[int], bool]:
        gone.update((drops or {}).get(stage, set()))
        return lambda u: u not in gone

    def client(u: int) -> SecAggClient:
        if persist:
            clients[u] = SecAggClient.from_bytes(clients[u].to_bytes())
        return clients[u]

    ok = live("keys")
    keys = {u: client(u).handle_setup(req, u) for u, req in server.setup_requests().items() if ok(u)}
    ok = live("shares")
    shares = {u: client(u).handle_keys(b) for u, b in server.collect_keys(keys).items() if ok(u)}
    ok = live("masked")
    masked = {u: client(u).handle_mask(m, xs[u]) for u, m in server.collect_shares(shares).items() if ok(u)}
    ok = live("unmask")
    unmask = {u: client(u).handle_unmask(r) for u, r in server.collect_masked(masked).items() if ok(u)}
    total = server.collect_unmask(unmask)
    return RoundResult(server, clients, xs, total, masked)
