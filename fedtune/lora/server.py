"""LoRA-FedAvg server state: the global adapter, reply validation, aggregation of adapter deltas.

Clients return their updated adapter weights (FedIT). The server validates them, turns them into
deltas against the global adapter, and hands the deltas to the configured aggregator: with the
weighted mean this is exactly FedAvg on the weights, and robust aggregators see updates rather
than raw weights, as they expect.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import Aggregator, ClientUpdate
from fedtune.fedkseed.server import MAX_NUM_EXAMPLES, Rejection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterReply:
    node_id: int
    server_round: int
    num_examples: int
    arrays: Mapping[str, npt.NDArray[np.generic]]
    train_loss: float
    peak_memory_mb: float


@dataclass(frozen=True)
class LoRARoundOutcome:
    server_round: int
    accepted: tuple[int, ...]
    rejected: tuple[Rejection, ...]
    train_loss: float
    applied: bool
    peak_memory_mb: float


@dataclass
class LoRAFedAvgServer:
    """Global adapter weights plus the aggregator; state changes only after full validation."""

    global_arrays: dict[str, npt.NDArray[np.float32]]
    aggregator: Aggregator
    completed_round: int = field(default=0)

    def validate(
        self, reply: AdapterReply, server_round: int, *, expected: set[int], seen: set[int]
    ) -> ClientUpdate | Rejection:
        node = reply.node_id
        if node not in expected:
            return Rejection(node, "reply from a node that was not sampled this round")
        if node in seen:
            return Rejection(node, "duplicate reply for this round")
        if reply.server_round != server_round:
            return Rejection(node, f"reply is for round {reply.server_round}, expected {server_round}")
        if not 0 < reply.num_examples <= MAX_NUM_EXAMPLES:
            return Rejection(node, f"absurd num_examples {reply.num_examples}")
        if set(reply.arrays) != set(self.global_arrays):
            return Rejection(node, "adapter names differ from the global adapter")
        deltas: dict[str, npt.NDArray[np.float32]] = {}
        for name, ref in self.global_arrays.items():
            arr = np.asarray(reply.arrays[name])
            if arr.dtype != np.float32:
                return Rejection(node, f"adapter {name} has dtype {arr.dtype}, expected float32")
            if arr.shape != ref.shape:
                return Rejection(node, f"adapter {name} has shape {arr.shape}, expected {ref.shape}")
            if not np.isfinite(arr).all():
                return Rejection(node, f"adapter {name} holds NaN or Inf")
            deltas[name] = arr - ref
        seen.add(node)
        return ClientUpdate(node, reply.num_examples, deltas)

    def aggregate_round(
        self, server_round: int, replies: Sequence[AdapterReply], *, expected: set[int], min_replies: int
    ) -> LoRARoundOutcome:
        updates: list[ClientUpdate] = []
        rejected: list[Rejection] = []
        losses: list[tuple[float, int]] = []
        peak = 0.0
        seen: set[int] = set()
        for reply in replies:
            res = self.validate(reply, server_round, expected=expected, seen=seen)
            if isinstance(res, Rejection):
                log.warning(
                    "round %d: rejected reply from node %d: %s", server_round, res.node_id, res.reason
                )
                rejected.append(res)
                continue
            updates.append(res)
            losses.append((reply.train_loss, reply.num_examples))
            peak = max(peak, reply.peak_memory_mb)
        updates.sort(key=lambda u: u.node_id)
        n = sum(w for _, w in losses)
        loss = sum(v * w for v, w in losses) / n if n else float("nan")
        kw = dict(
            server_round=server_round,
            accepted=tuple(u.node_id for u in updates),
            rejected=tuple(rejected),
            train_loss=loss,
            peak_memory_mb=peak,
        )
        if len(updates) < min_replies:
            return LoRARoundOutcome(**kw, applied=False)  # type: ignore[arg-type]
        agg = self.aggregator.aggregate(server_round, updates)
        new = {}
        for name, ref in self.global_arrays.items():
            delta = np.asarray(agg.arrays[name], dtype=np.float32)
            if delta.shape != ref.shape or not np.isfinite(delta).all():
                raise ValueError(f"aggregator returned a bad delta for {name}: shape {delta.shape}")
            new[name] = (ref + delta).astype(np.float32)
        self.global_arrays = new
        self.completed_round += 1
        return LoRARoundOutcome(**kw, applied=True)  # type: ignore[arg-type]
