"""FedKSeed server state: the cumulative per-seed accumulator, Pro statistics, reply validation.

FedKSeed (Qin et al., ICML 2024) never moves weights: the global model is
theta_r = theta_0 + sum_s A_s z_s, where A is a K-vector that is only ever added to. Each round
the server turns every valid client reply (per-step seed indices and scalar gradients) into a
dense K-vector of lr-folded coefficients, hands those to the configured aggregator and adds the
aggregate to A. Because the round's learning rate is folded in here, any lr schedule stays exact.

The server validates every reply before anything changes: a rejected reply is logged with the
node id and the reason and never touches the state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import Aggregator, ClientUpdate
from fedtune.fedkseed.pro import SeedImportance
from fedtune.wire.codec import (
    PayloadError,
    ReplyPayload,
    SparseDelta,
    SyncPayload,
    decode_reply,
    quantize_probabilities,
)

log = logging.getLogger(__name__)

COEFFICIENTS = "coefficients"
# A client that claims more examples than this is lying or broken; weights would be absurd.
MAX_NUM_EXAMPLES = 10**9


@dataclass(frozen=True)
class RoundSettings:
    """What every sampled client runs this round."""

    server_round: int
    lr: float
    eps: float
    num_local_steps: int
    batch_size: int


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str


@dataclass(frozen=True)
class RoundOutcome:
    """The result of one aggregation: who counted, who was rejected, and what changed."""

    server_round: int
    accepted: tuple[int, ...]
    rejected: tuple[Rejection, ...]
    train_loss: float
    num_examples: int
    seeds_touched: int
    applied: bool
    peak_memory_mb: float = 0.0
    skipped_steps: int = 0


def coefficients_from_steps(
    seed_indices: npt.NDArray[np.integer], grads: npt.NDArray[np.floating], *, lr: float, num_seeds: int
) -> npt.NDArray[np.float64]:
    """Dense K-vector of the coefficients a client applied locally: sum_t -lr * g_t at s_t."""
    coef = np.zeros(num_seeds, dtype=np.float64)
    np.add.at(coef, np.asarray(seed_indices, dtype=np.int64), -lr * np.asarray(grads, dtype=np.float64))
    return coef


@dataclass
class FedKSeedServer:
    """Server-side FedKSeed / FedKSeed-Pro state; checkpointable with :meth:`save` / :meth:`load`."""

    num_seeds: int
    aggregator: Aggregator
    fingerprint: str
    pro: bool = False
    pro_clip: float = 1000.0
    sparse_sync: bool = False
    accumulator: npt.NDArray[np.float64] = field(init=False)
    importance: SeedImportance = field(init=False)
    completed_round: int = field(init=False, default=0)
    # node -> the round it was last synced in (it holds A as of that round's start).
    node_versions: dict[int, int] = field(init=False, default_factory=dict)
    # round -> the accumulator change that round applied (history for sparse syncs).
    round_deltas: dict[int, SparseDelta] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_seeds < 1:
            raise ValueError("num_seeds must be >= 1")
        self.accumulator = np.zeros(self.num_seeds, dtype=np.float64)
        self.importance = SeedImportance(self.num_seeds, clip=self.pro_clip)

    # -- download ------------------------------------------------------------------------------
    def make_sync(self, node_id: int, settings: RoundSettings) -> SyncPayload:
        """The payload a sampled node needs: the accumulator (dense or a sparse delta) and config."""
        probabilities = quantize_probabilities(self.importance.scores()) if self.pro else None
        accumulator: npt.NDArray[np.float32] | SparseDelta = self.accumulator.astype(np.float32)
        # A node never synced (or forgotten) gets A relative to zero (base 0), which it can always
        # apply: early in a run, or with few clients per round, few seeds are non-zero.
        base = self.node_versions.get(node_id, 0)
        if self.sparse_sync and base < settings.server_round:
            delta = self._delta_since(base)
            # uint16 index + float32 value per entry against 4 bytes per seed when dense.
            if delta.indices.size * 6 < self.num_seeds * 4:
                accumulator = delta
        # Versions are rounds: a node synced in round r holds A as it stood at the start of round r.
        self.node_versions[node_id] = settings.server_round
        return SyncPayload(
            server_round=settings.server_round,
            lr=settings.lr,
            eps=settings.eps,
            num_local_steps=settings.num_local_steps,
            batch_size=settings.batch_size,
            num_seeds=self.num_seeds,
            fingerprint=self.fingerprint,
            accumulator=accumulator,
            quantized_probabilities=probabilities,
        )

    def forget_node(self, node_id: int) -> None:
        """Next sync to this node is relative to zero (it reported a base it cannot apply a delta to)."""
        self.node_versions.pop(node_id, None)

    def _delta_since(self, base_round: int) -> SparseDelta:
        """A now minus A at the start of ``base_round`` (rounds without an update add nothing)."""
        total = np.zeros(self.num_seeds, dtype=np.float64)
        for v, d in self.round_deltas.items():
            if v >= base_round:
                np.add.at(total, d.indices.astype(np.int64), d.values.astype(np.float64))
        idx = np.flatnonzero(total).astype(np.uint32)
        return SparseDelta(base_round=base_round, indices=idx, values=total[idx].astype(np.float32))

    # -- upload --------------------------------------------------------------------------------
    def validate_reply(
        self,
        node_id: int,
        payload: bytes,
        settings: RoundSettings,
        *,
        expected_nodes: set[int],
        seen: set[int],
    ) -> _AcceptedUpdate | Rejection:
        """Decode and check one reply; a :class:`Rejection` says why it cannot count."""
        if node_id not in expected_nodes:
            return Rejection(node_id, "reply from a node that was not sampled this round")
        if node_id in seen:
            return Rejection(node_id, "duplicate reply for this round")
        try:
            reply = decode_reply(payload, num_seeds=self.num_seeds)
        except PayloadError as exc:
            return Rejection(node_id, f"malformed payload: {exc}")
        if reply.server_round != settings.server_round:
            return Rejection(
                node_id, f"reply is for round {reply.server_round}, expected {settings.server_round}"
            )
        if not np.isfinite(reply.train_loss):
            return Rejection(node_id, "train_loss is not finite")
        if reply.fingerprint != self.fingerprint:
            return Rejection(
                node_id, "model/perturbation fingerprint differs from the server's (run `fedtune zo-check`)"
            )
        if not 0 < reply.num_examples <= MAX_NUM_EXAMPLES:
            return Rejection(node_id, f"absurd num_examples {reply.num_examples}")
        n = int(reply.seed_indices.size)
        if n > settings.num_local_steps:
            return Rejection(node_id, f"{n} steps reported, at most {settings.num_local_steps} were asked")
        if n + reply.num_skipped_steps != settings.num_local_steps:
            return Rejection(
                node_id,
                f"{n} steps + {reply.num_skipped_steps} skipped != {settings.num_local_steps} asked",
            )
        coef = coefficients_from_steps(
            reply.seed_indices, reply.projected_grads, lr=settings.lr, num_seeds=self.num_seeds
        )
        if not np.isfinite(coef).all() or np.abs(coef).max(initial=0.0) > np.finfo(np.float32).max:
            return Rejection(node_id, "coefficients overflow float32")
        seen.add(node_id)
        arrays = {COEFFICIENTS: coef.astype(np.float32)}
        return _AcceptedUpdate(node_id=node_id, num_examples=reply.num_examples, arrays=arrays, reply=reply)

    def aggregate_round(
        self,
        settings: RoundSettings,
        replies: Sequence[tuple[int, bytes]],
        *,
        expected_nodes: set[int],
        min_replies: int,
    ) -> RoundOutcome:
        """Validate all replies, aggregate the valid ones and update the state atomically."""
        accepted: list[_AcceptedUpdate] = []
        rejected: list[Rejection] = []
        seen: set[int] = set()
        for node_id, payload in replies:
            result = self.validate_reply(node_id, payload, settings, expected_nodes=expected_nodes, seen=seen)
            if isinstance(result, Rejection):
                log.warning(
                    "round %d: rejected reply from node %d: %s", settings.server_round, node_id, result.reason
                )
                rejected.append(result)
            else:
                accepted.append(result)
        accepted.sort(key=lambda u: u.node_id)
        num_examples = sum(u.num_examples for u in accepted)
        mean_loss = (
            sum(u.reply.train_loss * u.num_examples for u in accepted) / num_examples
            if accepted
            else float("nan")
        )
        outcome_kw = dict(
            server_round=settings.server_round,
            accepted=tuple(u.node_id for u in accepted),
            rejected=tuple(rejected),
            train_loss=mean_loss,
            num_examples=num_examples,
            peak_memory_mb=max((u.reply.peak_memory_mb for u in accepted), default=0.0),
            skipped_steps=sum(u.reply.num_skipped_steps for u in accepted),
        )
        if len(accepted) < min_replies:
            log.warning(
                "round %d: %d valid replies < min_replies=%d; state unchanged",
                settings.server_round,
                len(accepted),
                min_replies,
            )
            return RoundOutcome(**outcome_kw, seeds_touched=0, applied=False)  # type: ignore[arg-type]
        updates = [ClientUpdate(u.node_id, u.num_examples, u.arrays) for u in accepted]
        global_update = self.aggregator.aggregate(settings.server_round, updates)
        delta = np.asarray(global_update.arrays[COEFFICIENTS], dtype=np.float64)
        if delta.shape != (self.num_seeds,) or not np.isfinite(delta).all():
            raise ValueError(
                f"aggregator {type(self.aggregator).__name__} returned {COEFFICIENTS!r} "
                f"of shape {delta.shape} "
                f"(or non-finite values); it must return a finite float32 vector of length {self.num_seeds}"
            )
        # Everything validated: now mutate.
        self.accumulator += delta
        self.completed_round += 1
        idx = np.flatnonzero(delta).astype(np.uint32)
        self.round_deltas[settings.server_round] = SparseDelta(
            base_round=settings.server_round, indices=idx, values=delta[idx].astype(np.float32)
        )
        if self.pro:
            for u in accepted:
                self.importance.update(u.reply.seed_indices, u.reply.projected_grads)
        return RoundOutcome(**outcome_kw, seeds_touched=int(idx.size), applied=True)  # type: ignore[arg-type]

    # -- checkpoint ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the whole server state (numpy arrays + JSON), including the aggregator's."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, npt.NDArray[np.generic]] = {"accumulator": self.accumulator}
        arrays.update({f"pro.{k}": np.asarray(v) for k, v in self.importance.state_dict().items()})
        for v, d in self.round_deltas.items():
            arrays[f"delta.{v}.indices"] = d.indices
            arrays[f"delta.{v}.values"] = d.values
        agg_state = self.aggregator.state_dict()
        arrays.update({f"agg.{k}": np.asarray(v) for k, v in agg_state.items()})
        np.savez(p / "server_state.npz", **arrays)  # type: ignore[arg-type]
        meta = {
            "num_seeds": self.num_seeds,
            "fingerprint": self.fingerprint,
            "completed_round": self.completed_round,
            "node_versions": {str(k): v for k, v in self.node_versions.items()},
            "aggregator": type(self.aggregator).__name__,
            "aggregator_keys": sorted(agg_state),
        }
        (p / "server_state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    def load(self, path: str | Path) -> None:
        """Restore a state written by :meth:`save` for the same K and fingerprint."""
        p = Path(path)
        meta = json.loads((p / "server_state.json").read_text(encoding="utf-8"))
        if meta["num_seeds"] != self.num_seeds or meta["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"checkpoint {p} is for K={meta['num_seeds']} / fingerprint "
                f"{meta['fingerprint'][:12]}, this run "
                f"has K={self.num_seeds} / {self.fingerprint[:12]}; resume with the same model and config"
            )
        with np.load(p / "server_state.npz") as data:
            self.accumulator = data["accumulator"].astype(np.float64)
            self.importance.load_state_dict({k[4:]: data[k] for k in data.files if k.startswith("pro.")})
            self.aggregator.load_state_dict({k: data[f"agg.{k}"] for k in meta["aggregator_keys"]})
            self.round_deltas = {}
            for k in data.files:
                if k.startswith("delta.") and k.endswith(".indices"):
                    v = int(k.split(".")[1])
                    self.round_deltas[v] = SparseDelta(
                        base_round=v, indices=data[k], values=data[f"delta.{v}.values"]
                    )
        self.completed_round = int(meta["completed_round"])
        self.node_versions = {int(k): int(v) for k, v in meta["node_versions"].items()}


@dataclass(frozen=True)
class _AcceptedUpdate:
    node_id: int
    num_examples: int
    arrays: Mapping[str, npt.NDArray[np.float32]]
    reply: ReplyPayload
