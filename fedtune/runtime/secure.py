"""Secure aggregation rounds over any transport: Bonawitz et al.'s stages as payload exchanges.

"Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017), with the
protocol in :mod:`fedtune.secagg`. One round is four exchanges through the same
:class:`~fedtune.runtime.transport.Transport` every algorithm uses (tested on the in-process
grid; Ray simulation and deployment deliver the same messages): keys, encrypted shares, masked
inputs (the algorithm's own training happens here), unmasking. The server half never sees a client's vector:
it gets the survivors' weighted sum (:meth:`ServerAlgorithm.aggregate_sum`) and their public
remainders. A stage with fewer than the threshold of live clients aborts the round cleanly with
the state untouched, as any failed round does.

Each client's vector travels as ``x * w / max_weight`` with ``w / max_weight`` appended, so the
one secure sum gives both the weighted sum and the total weight.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedtune.algorithms.base import NodeReply, Rejection, RoundOutcome, ServerAlgorithm
from fedtune.config import RunConfig
from fedtune.runtime.transport import ReplyCallback, RoundRequest, Transport
from fedtune.secagg import (
    SecAggAbort,
    SecAggPayloadError,
    SecAggServer,
    Stage,
    decode_envelope,
    encode_envelope,
)
from fedtune.secagg.messages import Message


def threshold_for(cfg: RunConfig, num_clients: int) -> int:
    """t = max(2, ceil(secagg.threshold * n)), at most n."""
    return min(num_clients, max(2, math.ceil(cfg.secagg.threshold * num_clients - 1e-9)))


def weighted_vector(
    vector: npt.NDArray[np.float64], weight: float, *, max_weight: float
) -> npt.NDArray[np.float64]:
    """What a client feeds the secure sum: ``x * w / max_weight`` then ``w / max_weight``."""
    if not 0 < weight <= max_weight:
        raise ValueError(
            f"a client's weight {weight} is outside (0, secagg.max-weight = {max_weight}]; raise "
            "secagg.max-weight to the largest example count a client holds"
        )
    scaled = weight / max_weight
    return np.concatenate([np.asarray(vector, dtype=np.float64) * scaled, [scaled]])


@dataclass
class SecureExchange:
    """One secure round: its outcome, what was sent and received, and where the time went."""

    outcome: RoundOutcome
    payloads: dict[int, bytes]
    replies: list[NodeReply]
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)
    clipped: int = 0


class SecureRound:
    """Drives the stages of one secure-aggregation round for a server half that supports it."""

    def __init__(
        self,
        cfg: RunConfig,
        server: ServerAlgorithm,
        transport: Transport,
        *,
        note: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        self.cfg = cfg
        self.server = server
        self.transport = transport
        self.note = note

    def run(
        self,
        server_round: int,
        clients: list[int],
        run_key: str,
        *,
        min_replies: int,
        on_reply: ReplyCallback | None = None,
    ) -> SecureExchange:
        payloads = self.server.configure(server_round, clients)
        nodes = sorted(payloads)
        sec = self.cfg.secagg
        secagg = SecAggServer(
            run_key=run_key,
            server_round=server_round,
            participants=tuple(nodes),
            threshold=threshold_for(self.cfg, len(nodes)),
            vector_length=self.server.summand_length(server_round) + 1,
            fraction_bits=sec.fraction_bits,
            clip=sec.clip,
        )
        ex = SecureExchange(
            RoundOutcome(server_round, False, (), ()),
            payloads,
            [],
            {n: 0 for n in nodes},
            {n: 0 for n in nodes},
        )
        errors: dict[int, NodeReply] = {}
        publics: dict[int, bytes] = {}

        def stage(
            kind: Stage, bodies: Mapping[int, Message], inner: Mapping[int, bytes] | None = None
        ) -> dict[int, Any]:
            t0 = time.perf_counter()
            envelopes = {n: encode_envelope(kind, b, (inner or {}).get(n, b"")) for n, b in bodies.items()}
            request = RoundRequest(server_round, envelopes, run_key, self.cfg.federation.round_timeout_s)
            exchange = self.transport.exchange(request, on_reply if kind == Stage.MASK else None)
            out: dict[int, Any] = {}
            for n, env in envelopes.items():
                ex.bytes_down[n] = ex.bytes_down.get(n, 0) + len(env)
            for reply in exchange.replies:
                if reply.payload is None:
                    errors[reply.node_id] = reply
                    continue
                ex.bytes_up[reply.node_id] = ex.bytes_up.get(reply.node_id, 0) + len(reply.payload)
                try:
                    got, body, extra = decode_envelope(
                        reply.payload,
                        expect_reply=True,
                        vector_length=secagg.setup.vector_length if kind == Stage.MASK else None,
                    )
                except SecAggPayloadError as exc:
                    secagg.rejected[reply.node_id] = f"malformed secure-aggregation reply: {exc}"
                    continue
                if got != kind:
                    secagg.rejected[reply.node_id] = f"answered stage {got.name} to a {kind.name} request"
                    continue
                out[reply.node_id] = body
                if kind == Stage.MASK:
                    publics[reply.node_id] = extra
            ex.stage_s[kind.name.lower()] = round(time.perf_counter() - t0, 3)
            return out

        try:
            self.note(f"round {server_round}: secure aggregation over clients {nodes}")
            keys = stage(Stage.SETUP, secagg.setup_requests())
            shares = stage(Stage.KEYS, secagg.collect_keys(keys))
            masked = stage(Stage.MASK, secagg.collect_shares(shares), payloads)
            unmask = stage(Stage.UNMASK, secagg.collect_masked(masked))
            ex.clipped = secagg.clipped
            total = secagg.collect_unmask(unmask)
        except SecAggAbort as exc:
            ex.replies = list(errors.values())
            rejected = tuple(Rejection(n, r) for n, r in sorted(secagg.rejected.items()))
            rejected += tuple(
                Rejection(n, f"{r.error.code.name}: {r.error.message}")
                for n, r in sorted(errors.items())
                if r.error is not None
            )
            ex.outcome = RoundOutcome(
                server_round, False, (), rejected, note=f"secure aggregation aborted: {exc}"
            )
            return ex
        max_weight = sec.max_weight
        survivors = sorted(secagg.survivors)
        ex.replies = [NodeReply(n, payload=publics[n]) for n in survivors if n in publics]
        ex.replies += [r for n, r in sorted(errors.items()) if n not in survivors]
        outcome = self.server.aggregate_sum(
            server_round,
            total[:-1] * max_weight,
            float(total[-1] * max_weight),
            ex.replies,
            min_replies=min_replies,
        )
        extra = tuple(Rejection(n, r) for n, r in sorted(secagg.rejected.items()))
        ex.outcome = RoundOutcome(
            outcome.server_round,
            outcome.applied,
            outcome.accepted,
            outcome.rejected + extra,
            {**outcome.metrics, "secagg_survivors": len(survivors), "secagg_clipped": ex.clipped},
            outcome.note,
        )
        return ex
