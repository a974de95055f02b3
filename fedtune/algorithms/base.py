"""The algorithm API: a registered ``Algorithm`` builds a server half and a client half.

Both halves are Flower-free and exchange only ``bytes`` (the algorithm's own versioned protobuf
payloads), so one generic runtime (``fedtune.runtime``) and one Flower adapter serve every
algorithm, and an algorithm is tested without any runtime at all. The shape follows Flower's
split of a Strategy from what its messages mean; the registry is the aggregators' (see
``docs/algorithms.md``).

A round, as the run loop drives it::

    payloads = server.configure(round, nodes)          # {node_id: bytes}
    replies  = <runtime delivers; each node runs client.train(payload, node)>
    outcome  = server.aggregate(round, replies, min_replies=m)   # validate first, then mutate
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import Aggregator, StateValue
from fedtune.runlog import MetricValue, PhaseTimer
from fedtune.wire.errors import ClientErrorPayload, ErrorCode

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedtune.config import RunConfig
    from fedtune.data.node import NodeData

MetricNumber = int | float


class ClientError(Exception):
    """Raised by a client half for a failure the server should act on (it travels as a typed code).

    ``held_version`` is, for :attr:`ErrorCode.STALE_SYNC`, the round whose state the node holds
    (``None``: it holds nothing), so the server can resend from there.
    """

    def __init__(self, code: ErrorCode, message: str, *, held_version: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.held_version = held_version


@dataclass(frozen=True)
class NodeReply:
    """What one sampled node answered: its payload, or a typed error (exactly one of them)."""

    node_id: int
    payload: bytes | None = None
    error: ClientErrorPayload | None = None

    def __post_init__(self) -> None:
        if (self.payload is None) == (self.error is None):
            raise ValueError("a NodeReply holds either a payload or an error, not both or neither")


@dataclass(frozen=True)
class Rejection:
    """A reply that did not count, and why (logged with the node id)."""

    node_id: int
    reason: str


@dataclass(frozen=True)
class RoundOutcome:
    """One aggregation: who counted, who did not, whether the state changed, and round metrics.

    ``metrics`` are algorithm-specific numbers for ``metrics.jsonl`` (train_loss,
    client_peak_mb, seeds_touched, ...); NaN means "not measured".
    """

    server_round: int
    applied: bool
    accepted: tuple[int, ...]
    rejected: tuple[Rejection, ...]
    metrics: Mapping[str, MetricNumber] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class EvalModel:
    """What the server's evaluator scores: a causal LM and its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


@dataclass(frozen=True)
class NodeContext:
    """Everything a client half may use for one round on one node.

    partition_id: the node's stable identity (seeds per-client randomness, so a run is
    reproducible whatever node ids the runtime assigns). data: the node's own examples only.
    state_dir: a folder private to this node and run for state that must survive between
    rounds (a fresh process per message in deployment); write it atomically. timer: where the
    client half records its phases (``with node.timer.phase("replay"): ...``); the runtime
    writes them to ``node-rounds.jsonl`` in ``state_dir``.
    """

    node_id: int
    partition_id: int
    data: NodeData
    state_dir: Path
    timer: PhaseTimer = field(default_factory=PhaseTimer)


@dataclass(frozen=True)
class Summand:
    """A client's round under secure aggregation: what the server may only see summed, and the rest.

    vector: the client's update as one float64 vector (the server learns only the weighted sum of
    all survivors' vectors). weight: its weight in the mean (its example count). public: the
    algorithm's reply without the vector (round, fingerprint, loss, DP figures), sent in the clear.
    """

    vector: npt.NDArray[np.float64]
    weight: float
    public: bytes


class ServerAlgorithm(ABC):
    """The server half: its state, one payload per sampled node, validate-and-aggregate.

    :meth:`aggregate` must check every reply before it changes anything: a rejected reply, a
    round below ``min_replies`` or an aggregator error leaves the global state exactly as it was.
    One exception, by design: what a node reports about its own sync state (a typed
    ``STALE_SYNC`` error with ``held_version``) may be recorded even in a skipped round, since it
    only changes what that node is sent next; otherwise a lone stale node could never recover.
    """

    #: Equal states send equal payloads (the conformance suite checks it); False for a server
    #: whose payloads carry per-round secrets such as access tokens.
    deterministic_payloads: ClassVar[bool] = True

    @property
    def min_updates(self) -> int:
        """Fewest accepted updates a round can aggregate (e.g. the aggregator's ``min_clients``)."""
        return 1

    @abstractmethod
    def configure(self, server_round: int, node_ids: Sequence[int]) -> dict[int, bytes]:
        """The payload for each sampled node this round (a node may be left out)."""

    @abstractmethod
    def aggregate(self, server_round: int, replies: Sequence[NodeReply], *, min_replies: int) -> RoundOutcome:
        """Validate the round's replies (errors included), aggregate the valid ones, update state."""

    @abstractmethod
    def state_dict(self) -> dict[str, StateValue]:
        """Everything needed to continue the run (arrays and scalars only), aggregator included."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore :meth:`state_dict`; a state for another run configuration raises ValueError."""

    def summand_length(self, server_round: int) -> int:
        """Length of each client's :class:`Summand` vector this round (secure aggregation)."""
        raise NotImplementedError(f"{type(self).__name__} does not support secure aggregation")

    def aggregate_sum(
        self,
        server_round: int,
        weighted_sum: npt.NDArray[np.float64],
        total_weight: float,
        replies: Sequence[NodeReply],
        *,
        min_replies: int,
    ) -> RoundOutcome:
        """Apply a securely aggregated round: ``sum_i w_i x_i`` and ``sum_i w_i`` over the survivors.

        ``replies`` are the survivors' public parts (``payload`` = :attr:`Summand.public`) and the
        errors of nodes that failed; validate them before changing anything, as in :meth:`aggregate`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support secure aggregation")

    def eval_model(self) -> EvalModel | None:
        """The current global model for the server's held-out evaluation (None: no evaluation)."""
        return None

    def evaluate(self, heldout: datasets.Dataset) -> Mapping[str, MetricValue]:
        """Metrics on the server's held-out split, for a server half with no :meth:`eval_model`
        (e.g. a classifier, or a model split across parties); the default measures nothing."""
        return {}

    def close(self) -> None:  # noqa: B027  (optional hook: most server halves hold nothing open)
        """Release what the server half holds open (ports, threads); called once when the run ends."""

    def describe(self) -> str:
        """One line for the run's first log line."""
        return type(self).__name__

    def export(self, out_dir: Path) -> None:
        """Write the current global model as users load it (default: a Hugging Face checkpoint)."""
        em = self.eval_model()
        if em is None:
            raise ValueError(f"{type(self).__name__} has no model to export")
        em.model.save_pretrained(out_dir, safe_serialization=True)
        em.tokenizer.save_pretrained(out_dir)


class ClientAlgorithm(ABC):
    """The client half: one round from the server's payload and the node's own data."""

    @abstractmethod
    def train(self, payload: bytes, node: NodeContext) -> bytes:
        """Run the round and return the reply payload; raise :class:`ClientError` for typed failures."""

    def train_summand(self, payload: bytes, node: NodeContext) -> Summand:
        """The round under secure aggregation: the update as a vector plus its public remainder."""
        raise NotImplementedError(f"{type(self).__name__} does not support secure aggregation")


class Algorithm(ABC):
    """A federated algorithm, registered by name or loaded from ``"package.module:Class"``.

    The constructor takes the run config first; any further keyword parameters are the
    algorithm's options, filled from ``[algorithm.options]`` and checked against the signature.
    Both halves are built lazily, so a client process never builds the server half.
    """

    name: ClassVar[str] = ""
    #: Both halves implement the secure-aggregation hooks (:class:`Summand`, ``aggregate_sum``).
    supports_secure_aggregation: ClassVar[bool] = False
    #: The ``privacy.mechanism`` values this algorithm implements besides ``none``.
    privacy_mechanisms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def server(self, aggregator: Aggregator) -> ServerAlgorithm:
        """Build the server half (holds the global state) around the configured aggregator."""

    @abstractmethod
    def client(self) -> ClientAlgorithm:
        """Build (or fetch a process-cached) client half."""
