"""FedKSeed as a Flower Strategy: seeds and scalars only, never weights.

The strategy owns sampling, message building and reply bookkeeping; the maths and all validation
live in :class:`fedtune.fedkseed.server.FedKSeedServer`, and aggregation in the configured
:class:`fedtune.aggregators.base.Aggregator`, so researchers never touch this file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.config import RunConfig
from fedtune.fedkseed.server import FedKSeedServer, Rejection, RoundOutcome, RoundSettings
from fedtune.flower.records import message_nbytes, payload_content, payload_from
from fedtune.wire.codec import encode_sync

log = logging.getLogger(__name__)
SAMPLING_TAG = 0x5A3F1E


@dataclass
class RoundTraffic:
    """Bytes measured from the real messages of one round (mean per client)."""

    payload_down: list[int] = field(default_factory=list)
    payload_up: list[int] = field(default_factory=list)
    message_down: list[int] = field(default_factory=list)
    message_up: list[int] = field(default_factory=list)

    @staticmethod
    def _mean(values: list[int]) -> float:
        return float(np.mean(values)) if values else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "payload_bytes_down": self._mean(self.payload_down),
            "payload_bytes_up": self._mean(self.payload_up),
            "message_bytes_down": self._mean(self.message_down),
            "message_bytes_up": self._mean(self.message_up),
        }


INFO_RECORD = "info"


def discover_partitions(grid: Grid, node_ids: list[int], timeout: float) -> dict[int, int]:
    """Ask nodes for their partition id (``query.info``); nodes that do not answer are left out.

    Node ids are random per run (uint64), partition ids are the user's stable names for clients:
    sampling by partition id makes a simulation reproducible from ``run.seed``.
    """
    queries = [
        Message(RecordDict({INFO_RECORD: ConfigRecord({})}), n, f"{MessageType.QUERY}.info") for n in node_ids
    ]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        if reply.has_error() or INFO_RECORD not in reply.content.config_records:
            log.warning("node %d did not answer query.info; it will not be sampled", node)
            continue
        pid = reply.content.config_records[INFO_RECORD].get("partition-id")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
            found[node] = pid
        else:
            log.warning("node %d reported an invalid partition-id %r; it will not be sampled", node, pid)
    return found


class NodeSampler:
    """Samples connected nodes by their partition ids with a generator keyed by (run seed, round)."""

    def __init__(self, *, run_seed: int, wait_s: float = 300.0, query_timeout: float = 120.0) -> None:
        self.run_seed = run_seed
        self.wait_s = wait_s
        self.query_timeout = query_timeout
        self.partitions: dict[int, int] = {}

    def sample(self, grid: Grid, wanted: int, server_round: int) -> list[int]:
        deadline = time.monotonic() + self.wait_s
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            new = [n for n in nodes if n not in self.partitions]
            if new:
                self.partitions.update(discover_partitions(grid, new, self.query_timeout))
            live = [n for n in nodes if n in self.partitions]
            if len(live) >= wanted:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(live)} usable nodes after {self.wait_s:.0f} s, {wanted} needed; "
                    "start more SuperNodes or lower federation.clients-per-round"
                )
            time.sleep(1.0)
        by_partition = sorted(live, key=lambda n: (self.partitions[n], n))
        rng = np.random.default_rng(np.random.SeedSequence([SAMPLING_TAG, self.run_seed, server_round]))
        return sorted(by_partition[i] for i in rng.choice(len(by_partition), size=wanted, replace=False))


class FedKSeedStrategy(Strategy):
    """FedKSeed / FedKSeed-Pro (Qin et al., ICML 2024) on Flower's Message API."""

    def __init__(
        self,
        *,
        cfg: RunConfig,
        server: FedKSeedServer,
        on_round: Callable[[RoundOutcome, RoundTraffic, float], None] | None = None,
        node_wait_s: float = 300.0,
    ) -> None:
        self.cfg = cfg
        self.server = server
        self.on_round = on_round
        self.sampler = NodeSampler(run_seed=cfg.run.seed, wait_s=node_wait_s)
        self.stopped = False
        self.outcomes: list[RoundOutcome] = []
        self._settings: RoundSettings | None = None
        self._expected: set[int] = set()
        self._traffic = RoundTraffic()
        self._round_start = 0.0

    # -- Strategy hooks ------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node its sync payload (accumulator, round lr, Pro probabilities)."""
        if self.stopped:
            return []
        self._round_start = time.perf_counter()
        zo = self.cfg.zo
        self._settings = RoundSettings(
            server_round=server_round,
            lr=zo.lr_at(server_round, self.cfg.federation.num_rounds),
            eps=zo.eps,
            num_local_steps=zo.local_steps,
            batch_size=zo.batch_size,
        )
        nodes = self.sampler.sample(grid, self.cfg.federation.clients_per_round, server_round)
        self._expected = set(nodes)
        self._traffic = RoundTraffic()
        messages = []
        for node in nodes:
            payload = encode_sync(self.server.make_sync(node, self._settings))
            msg = Message(payload_content(payload), node, MessageType.TRAIN, group_id=str(server_round))
            self._traffic.payload_down.append(len(payload))
            messages.append(msg)
        if messages:
            self._traffic.message_down.append(message_nbytes(messages[0]))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and aggregate; rejected replies are logged and never touch the state."""
        if self.stopped or self._settings is None:
            return None, None
        pairs: list[tuple[int, bytes]] = []
        pre_rejected: list[Rejection] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                reason = msg.error.reason or "unknown error"
                if "StaleSyncError" in reason:
                    self.server.forget_node(node)
                log.warning("round %d: node %d replied with an error: %s", server_round, node, reason)
                pre_rejected.append(Rejection(node, f"client error: {reason[:200]}"))
                continue
            try:
                payload = payload_from(msg)
            except ValueError as exc:
                log.warning("round %d: rejected reply from node %d: %s", server_round, node, exc)
                pre_rejected.append(Rejection(node, str(exc)))
                continue
            self._traffic.payload_up.append(len(payload))
            if not self._traffic.message_up:
                self._traffic.message_up.append(message_nbytes(msg))
            pairs.append((node, payload))
        outcome = self.server.aggregate_round(
            self._settings, pairs, expected_nodes=self._expected, min_replies=self.cfg.federation.min_replies
        )
        if pre_rejected:
            outcome = RoundOutcome(**{**outcome.__dict__, "rejected": tuple(pre_rejected) + outcome.rejected})
        self.outcomes.append(outcome)
        if not outcome.applied:
            log.error(
                "round %d: %d valid replies, below federation.min-replies=%d; ending the run cleanly",
                server_round,
                len(outcome.accepted),
                self.cfg.federation.min_replies,
            )
            self.stopped = True
        if self.on_round is not None:
            self.on_round(outcome, self._traffic, time.perf_counter() - self._round_start)
        arrays = ArrayRecord({"accumulator": Array(self.server.accumulator.astype(np.float32))})
        metrics = MetricRecord(
            {
                "train-loss": float(outcome.train_loss) if np.isfinite(outcome.train_loss) else -1.0,
                "num-accepted": len(outcome.accepted),
                "num-rejected": len(outcome.rejected),
            }
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation is server-side on the held-out split (``evaluate_fn``); no client messages."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        c = self.cfg
        log.info(
            "FedKSeed%s: K=%d, %d/%d clients per round, tau=%d, lr=%g (%s), eps=%g, aggregator=%s",
            "-Pro" if self.server.pro else "",
            c.fedkseed.num_seeds,
            c.federation.clients_per_round,
            c.federation.num_clients,
            c.zo.local_steps,
            c.zo.lr,
            c.zo.lr_schedule,
            c.zo.eps,
            c.aggregator.name,
        )
