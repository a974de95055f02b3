"""Round primitives every server half shares: reply admission, bounded weights, safe aggregation.

Kept in one place so that every algorithm rejects the same things with the same words, and no
algorithm can forget the checks that make a fault end a round instead of the run.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate
from fedtune.algorithms.base import NodeReply, Rejection

log = logging.getLogger(__name__)

# A client that claims more examples than this is broken or lying, whatever the bound below says.
MAX_NUM_EXAMPLES = 10**9


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ReplyAdmission:
    """Per-round gate in front of validation: sampled nodes only, one reply each, errors recorded."""

    def __init__(self, server_round: int, expected: set[int]) -> None:
        self.server_round = server_round
        self.expected = expected
        self.seen: set[int] = set()
        self.rejected: list[Rejection] = []

    def admit(self, reply: NodeReply) -> bytes | None:
        """The payload to validate, or None (and a recorded rejection)."""
        node = reply.node_id
        reason = ""
        if node not in self.expected:
            reason = "reply from a node that was not sampled this round"
        elif node in self.seen:
            reason = "duplicate reply for this round"
        elif reply.error is not None:
            reason = f"client error {reply.error.code.name}: {reply.error.message[:300]}"
        self.seen.add(node)
        if reason:
            self.reject(node, reason)
            return None
        return reply.payload

    def reject(self, node: int, reason: str) -> None:
        log.warning("round %d: rejected reply from node %d: %s", self.server_round, node, reason)
        self.rejected.append(Rejection(node, reason))


def bounded_weights(claims: Sequence[int], max_ratio: float) -> list[int]:
    """Cap each claimed example count at ``max_ratio`` times the round's median claim.

    Example counts are self-reported: without a cap one client claiming 10^9 examples owns an
    example-weighted mean. The median is what most clients say, so honest skew (a client with
    a few times the median's data) keeps its weight while a liar's is cut to the cap.
    """
    if not claims:
        return []
    cap = max(1, math.floor(max_ratio * float(np.median(np.asarray(claims, dtype=np.float64)))))
    return [min(int(c), cap) for c in claims]


def aggregate_updates(
    aggregator: Aggregator,
    server_round: int,
    updates: Sequence[ClientUpdate],
    *,
    max_weight_ratio: float,
) -> GlobalUpdate | str:
    """Aggregate with bounded weights; a string says why the round cannot be aggregated.

    Never raises for a round the aggregator refuses (too few updates for Krum, say): the caller
    skips the round and its state stays as it was.
    """
    if len(updates) < aggregator.min_clients:
        return (
            f"{len(updates)} valid updates, but aggregator {aggregator.name or type(aggregator).__name__} "
            f"needs at least {aggregator.min_clients}"
        )
    weights = bounded_weights([u.num_examples for u in updates], max_weight_ratio)
    capped = [replace(u, num_examples=w) for u, w in zip(updates, weights, strict=True)]
    for u, w in zip(updates, weights, strict=True):
        if w < u.num_examples:
            log.warning(
                "round %d: node %d claims %d examples; its weight is capped at %d "
                "(aggregator.max-weight-ratio x the median claim)",
                server_round,
                u.node_id,
                u.num_examples,
                w,
            )
    try:
        return aggregator.aggregate(server_round, capped)
    except ValueError as exc:
        return f"aggregator {aggregator.name or type(aggregator).__name__} refused the round: {exc}"


def check_global(
    glob: GlobalUpdate, shapes: dict[str, tuple[int, ...]], aggregator: Aggregator
) -> str | None:
    """A reason if the aggregator's result does not match the client arrays (names, shapes, finite)."""
    if set(glob.arrays) != set(shapes):
        name = type(aggregator).__name__
        return f"aggregator {name} returned arrays {sorted(glob.arrays)}, expected {sorted(shapes)}"
    for name, shape in shapes.items():
        arr = glob.arrays[name]
        if arr.shape != shape or not np.isfinite(arr).all():
            return (
                f"aggregator {type(aggregator).__name__} returned {name!r} of shape {arr.shape} "
                f"(or non-finite values); expected a finite float32 array of shape {shape}"
            )
    return None
