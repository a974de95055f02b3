"""Round primitives every server half shares: reply admission, bounded weights, safe aggregation.

Kept in one place so that every algorithm rejects the same things with the same words, and no
algorithm can forget the checks that make a fault end a round instead of the run.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate, StateValue
from fedtune.algorithms.base import MetricNumber, NodeReply, Rejection, RoundOutcome

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


@dataclass(frozen=True)
class AcceptedUpdate:
    """A reply that passed validation, as the aggregator will see it, plus what it reported."""

    update: ClientUpdate
    train_loss: float
    peak_memory_mb: float


class RoundBook(ReplyAdmission):
    """One round's bookkeeping: the admission gate, the accepted updates, and how they become
    one aggregate or a skipped round. Every server half ends its round the same way through it.
    """

    def __init__(self, server_round: int, expected: set[int]) -> None:
        super().__init__(server_round, expected)
        self.accepted: list[AcceptedUpdate] = []

    def accept(self, update: ClientUpdate, *, train_loss: float, peak_memory_mb: float) -> None:
        self.accepted.append(AcceptedUpdate(update, train_loss, peak_memory_mb))

    @property
    def node_ids(self) -> tuple[int, ...]:
        """Accepted nodes, in canonical (ascending) order."""
        return tuple(sorted(a.update.node_id for a in self.accepted))

    def metrics(self) -> dict[str, MetricNumber]:
        """Example-weighted mean train loss and the peak client memory (NaN when nothing was accepted)."""
        # Canonical order, so the float sum does not depend on the order replies arrived in.
        accepted = sorted(self.accepted, key=lambda a: a.update.node_id)
        n = sum(a.update.num_examples for a in accepted)
        loss = sum(a.train_loss * a.update.num_examples for a in accepted) / n if n else float("nan")
        peak = max((a.peak_memory_mb for a in accepted), default=float("nan"))
        return {"train_loss": loss, "client_peak_mb": peak}

    def aggregate(
        self,
        aggregator: Aggregator,
        *,
        min_replies: int,
        shapes: dict[str, tuple[int, ...]],
        max_weight_ratio: float,
    ) -> GlobalUpdate | str:
        """The round's aggregate, or why there is none (too few updates, a refusal, a bad result)."""
        need = max(min_replies, aggregator.min_clients)
        if len(self.accepted) < need:
            return f"{len(self.accepted)} valid replies, fewer than the {need} needed"
        updates = sorted((a.update for a in self.accepted), key=lambda u: u.node_id)
        glob = aggregate_updates(aggregator, self.server_round, updates, max_weight_ratio=max_weight_ratio)
        if isinstance(glob, str):
            return glob
        problem = check_global(glob, shapes, aggregator)
        return glob if problem is None else problem

    def outcome(self, metrics: Mapping[str, MetricNumber], note: str = "") -> RoundOutcome:
        """Applied when there is no ``note`` (the reason a round was skipped)."""
        return RoundOutcome(self.server_round, not note, self.node_ids, tuple(self.rejected), metrics, note)


def with_prefix(prefix: str, state: Mapping[str, StateValue]) -> dict[str, StateValue]:
    """``state`` under ``prefix.`` keys, to nest a component's state_dict in its owner's."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def under_prefix(prefix: str, state: Mapping[str, StateValue]) -> dict[str, StateValue]:
    """The inverse of :func:`with_prefix`: the entries under ``prefix.``, without it."""
    head = f"{prefix}."
    return {k.removeprefix(head): v for k, v in state.items() if k.startswith(head)}


def secure_mean(
    book: RoundBook,
    weighted_sum: np.ndarray,
    total_weight: float,
    *,
    survivors: int,
    min_replies: int,
    length: int,
) -> np.ndarray | str:
    """The weighted mean from a secure sum, or why the round cannot use it.

    Every survivor's vector is inside the sum and cannot be taken out, so one survivor whose
    public reply fails validation spoils the whole round (it is skipped, state untouched).
    """
    if len(book.accepted) < survivors:
        return (
            f"{survivors - len(book.accepted)} of the {survivors} clients in the secure sum sent an invalid "
            "reply; their vectors cannot be removed from the sum, so the round is skipped"
        )
    if len(book.accepted) < min_replies:
        return f"{len(book.accepted)} valid replies, fewer than the {min_replies} needed"
    if weighted_sum.shape != (length,):
        return f"secure sum has shape {weighted_sum.shape}, expected ({length},)"
    if not (math.isfinite(total_weight) and total_weight > 0):
        return f"secure sum carries total weight {total_weight}; nothing to average"
    mean = np.asarray(weighted_sum, dtype=np.float64) / total_weight
    if not np.isfinite(mean).all():
        return "secure sum is not finite"
    return mean
