"""FedKSeed server half: the cumulative per-seed accumulator, Pro statistics, reply validation.

FedKSeed (Qin et al., ICML 2024) never moves weights: the global model is
theta_r = theta_0 + sum_s A_s z_s, where A is a K-vector that is only ever added to. Each round
the server turns every valid client reply (per-step seed indices and scalar gradients) into a
dense K-vector of lr-folded coefficients, hands those to the configured aggregator and adds the
aggregate to A. Because the round's learning rate is folded in here, any lr schedule stays exact.

Every reply is validated before anything changes: a rejected reply is logged with the node id
and the reason and never touches the state; so is a round the aggregator cannot aggregate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import Aggregator, ClientUpdate, StateValue
from fedtune.algorithms.base import EvalModel, NodeReply, RoundOutcome, ServerAlgorithm
from fedtune.algorithms.rounds import (
    MAX_NUM_EXAMPLES,
    ReplyAdmission,
    aggregate_updates,
    check_global,
)
from fedtune.fedkseed.pro import SeedImportance
from fedtune.wire.codec import (
    PayloadError,
    ReplyPayload,
    SparseDelta,
    SyncPayload,
    decode_reply,
    encode_sync,
    quantize_probabilities,
)
from fedtune.wire.errors import ErrorCode

log = logging.getLogger(__name__)

COEFFICIENTS = "coefficients"
STATE_VERSION = 2


@dataclass(frozen=True)
class RoundSettings:
    """What every sampled client runs this round."""

    server_round: int
    lr: float
    eps: float
    num_local_steps: int
    batch_size: int


def coefficients_from_steps(
    seed_indices: npt.NDArray[np.integer], grads: npt.NDArray[np.floating], *, lr: float, num_seeds: int
) -> npt.NDArray[np.float64]:
    """Dense K-vector of the coefficients a client applied locally: sum_t -lr * g_t at s_t."""
    coef = np.zeros(num_seeds, dtype=np.float64)
    np.add.at(coef, np.asarray(seed_indices, dtype=np.int64), -lr * np.asarray(grads, dtype=np.float64))
    return coef


@dataclass(frozen=True)
class _Accepted:
    node_id: int
    coefficients: npt.NDArray[np.float32]
    reply: ReplyPayload


class FedKSeedServer(ServerAlgorithm):
    """Server-side FedKSeed / FedKSeed-Pro state and round logic.

    ``settings(round)`` gives the round's lr, eps, tau and batch size (the lr schedule lives in the
    config). ``eval_model`` (optional) returns the evaluation replica synced to the accumulator.
    """

    def __init__(
        self,
        *,
        num_seeds: int,
        aggregator: Aggregator,
        fingerprint: str,
        settings: Callable[[int], RoundSettings],
        pro: bool = False,
        pro_clip: float = 1000.0,
        sparse_sync: bool = False,
        max_weight_ratio: float = 10.0,
        eval_model: Callable[[npt.NDArray[np.float64]], EvalModel] | None = None,
    ) -> None:
        if num_seeds < 1:
            raise ValueError("num_seeds must be >= 1")
        self.num_seeds = num_seeds
        self.aggregator = aggregator
        self.fingerprint = fingerprint
        self.settings = settings
        self.pro = pro
        self.sparse_sync = sparse_sync
        self.max_weight_ratio = max_weight_ratio
        self._eval_model = eval_model
        self.accumulator = np.zeros(num_seeds, dtype=np.float64)
        self.importance = SeedImportance(num_seeds, clip=pro_clip)
        self.completed_round = 0
        # node -> the round whose starting accumulator it confirmed holding (by an accepted reply
        # or a stale-sync report): sparse syncs are deltas against it.
        self.node_versions: dict[int, int] = {}
        # round -> the accumulator change that round applied (history for sparse syncs).
        self.round_deltas: dict[int, SparseDelta] = {}
        self._sent: tuple[int, set[int]] = (0, set())

    @property
    def min_updates(self) -> int:
        return self.aggregator.min_clients

    def describe(self) -> str:
        kind = "FedKSeed-Pro" if self.pro else "FedKSeed"
        return (
            f"{kind}: K={self.num_seeds}, aggregator={self.aggregator.name or type(self.aggregator).__name__}"
        )

    # -- download ------------------------------------------------------------------------------
    def make_sync(self, node_id: int, settings: RoundSettings) -> SyncPayload:
        """The payload a sampled node needs: the accumulator (dense or a sparse delta) and config."""
        probabilities = quantize_probabilities(self.importance.scores()) if self.pro else None
        accumulator: npt.NDArray[np.float32] | SparseDelta = self.accumulator.astype(np.float32)
        # A node never confirmed (or forgotten) gets A relative to zero (base 0), which it can always
        # apply: early in a run, or with few clients per round, few seeds are non-zero.
        base = self.node_versions.get(node_id, 0)
        if self.sparse_sync and base < settings.server_round:
            delta = self._delta_since(base)
            # uint16 index + float32 value per entry against 4 bytes per seed when dense.
            if delta.indices.size * 6 < self.num_seeds * 4:
                accumulator = delta
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

    def configure(self, server_round: int, node_ids: Sequence[int]) -> dict[int, bytes]:
        settings = self.settings(server_round)
        payloads = {n: encode_sync(self.make_sync(n, settings)) for n in node_ids}
        self._sent = (server_round, set(payloads))
        return payloads

    def forget_node(self, node_id: int) -> None:
        """Next sync to this node is relative to zero."""
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
    def validate_reply(self, payload: bytes, settings: RoundSettings) -> ReplyPayload | str:
        """Decode and check one reply; a string says why it cannot count."""
        try:
            reply = decode_reply(payload, num_seeds=self.num_seeds)
        except PayloadError as exc:
            return f"malformed payload: {exc}"
        if reply.server_round != settings.server_round:
            return f"reply is for round {reply.server_round}, expected {settings.server_round}"
        if reply.fingerprint != self.fingerprint:
            return "model/perturbation fingerprint differs from the server's (run `fedtune zo-check`)"
        if not 0 < reply.num_examples <= MAX_NUM_EXAMPLES:
            return f"absurd num_examples {reply.num_examples}"
        n = int(reply.seed_indices.size)
        if n + reply.num_skipped_steps != settings.num_local_steps:
            return f"{n} steps + {reply.num_skipped_steps} skipped != {settings.num_local_steps} asked"
        return reply

    def _note_error(self, reply: NodeReply, server_round: int) -> None:
        err = reply.error
        if err is None or err.code != ErrorCode.STALE_SYNC:
            return
        held = err.held_version
        # The node says which starting accumulator it holds; resend from there if we know it.
        if held is not None and 1 <= held <= server_round:
            self.node_versions[reply.node_id] = held
        else:
            self.forget_node(reply.node_id)

    def aggregate(self, server_round: int, replies: Sequence[NodeReply], *, min_replies: int) -> RoundOutcome:
        """Validate all replies, aggregate the valid ones and update the state atomically."""
        settings = self.settings(server_round)
        sent_round, sent = self._sent
        gate = ReplyAdmission(server_round, expected=sent if sent_round == server_round else set())
        accepted: list[_Accepted] = []
        for r in replies:
            self._note_error(r, server_round)
            payload = gate.admit(r)
            if payload is None:
                continue
            result = self.validate_reply(payload, settings)
            if isinstance(result, str):
                gate.reject(r.node_id, result)
                continue
            coef = coefficients_from_steps(
                result.seed_indices, result.projected_grads, lr=settings.lr, num_seeds=self.num_seeds
            )
            if not np.isfinite(coef).all() or np.abs(coef).max(initial=0.0) > np.finfo(np.float32).max:
                gate.reject(r.node_id, "coefficients overflow float32")
                continue
            accepted.append(_Accepted(r.node_id, coef.astype(np.float32), result))
        accepted.sort(key=lambda u: u.node_id)
        num_examples = sum(u.reply.num_examples for u in accepted)
        metrics: dict[str, int | float] = {
            "train_loss": (
                sum(u.reply.train_loss * u.reply.num_examples for u in accepted) / num_examples
                if accepted
                else float("nan")
            ),
            "client_peak_mb": max((u.reply.peak_memory_mb for u in accepted), default=float("nan")),
            "skipped_steps": sum(u.reply.num_skipped_steps for u in accepted),
            "lr": settings.lr,
            "seeds_touched": 0,
        }

        def skipped(note: str) -> RoundOutcome:
            log.warning("round %d: %s; state unchanged", server_round, note)
            return RoundOutcome(
                server_round, False, tuple(u.node_id for u in accepted), tuple(gate.rejected), metrics, note
            )

        need = max(min_replies, self.min_updates)
        if len(accepted) < need:
            return skipped(f"{len(accepted)} valid replies, fewer than the {need} needed")
        updates = [
            ClientUpdate(u.node_id, u.reply.num_examples, {COEFFICIENTS: u.coefficients}) for u in accepted
        ]
        glob = aggregate_updates(
            self.aggregator, server_round, updates, max_weight_ratio=self.max_weight_ratio
        )
        if isinstance(glob, str):
            return skipped(glob)
        problem = check_global(glob, {COEFFICIENTS: (self.num_seeds,)}, self.aggregator)
        if problem is not None:
            return skipped(problem)
        delta = np.asarray(glob.arrays[COEFFICIENTS], dtype=np.float64)
        # Everything validated: now mutate.
        self.accumulator += delta
        self.completed_round = server_round
        idx = np.flatnonzero(delta).astype(np.uint32)
        self.round_deltas[server_round] = SparseDelta(
            base_round=server_round, indices=idx, values=delta[idx].astype(np.float32)
        )
        for u in accepted:  # each accepted node holds A as of this round's start
            self.node_versions[u.node_id] = server_round
        kept = set(glob.kept) if glob.kept is not None else {u.node_id for u in accepted}
        if self.pro:  # seed importance learns only from the updates the aggregator kept
            for u in accepted:
                if u.node_id in kept:
                    self.importance.update(u.reply.seed_indices, u.reply.projected_grads)
        metrics["seeds_touched"] = int(idx.size)
        return RoundOutcome(
            server_round, True, tuple(u.node_id for u in accepted), tuple(gate.rejected), metrics
        )

    def eval_model(self) -> EvalModel | None:
        return None if self._eval_model is None else self._eval_model(self.accumulator)

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, StateValue]:
        """The whole server state, including the aggregator's, as arrays and scalars."""
        state: dict[str, StateValue] = {
            "version": STATE_VERSION,
            "num_seeds": self.num_seeds,
            "fingerprint": self.fingerprint,
            "completed_round": self.completed_round,
            "accumulator": self.accumulator.copy(),
            "node_ids": np.asarray(sorted(self.node_versions), dtype=np.int64),
            "node_rounds": np.asarray(
                [self.node_versions[n] for n in sorted(self.node_versions)], dtype=np.int64
            ),
            "delta_rounds": np.asarray(sorted(self.round_deltas), dtype=np.int64),
        }
        for v, d in self.round_deltas.items():
            state[f"delta.{v}.indices"] = d.indices.copy()
            state[f"delta.{v}.values"] = d.values.copy()
        state.update({f"pro.{k}": v for k, v in self.importance.state_dict().items()})
        state.update({f"agg.{k}": v for k, v in self.aggregator.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore a state written by :meth:`state_dict` for the same K and fingerprint."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"FedKSeed state version {state.get('version')!r} is not {STATE_VERSION}; "
                "resume with the fedtune version that wrote the checkpoint"
            )
        if state.get("num_seeds") != self.num_seeds or state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint is for K={state.get('num_seeds')} / fingerprint "
                f"{str(state.get('fingerprint'))[:12]}, this run has K={self.num_seeds} / "
                f"{self.fingerprint[:12]}; resume with the same model and config"
            )
        accumulator = np.asarray(state["accumulator"], dtype=np.float64)
        if accumulator.shape != (self.num_seeds,) or not np.isfinite(accumulator).all():
            raise ValueError("checkpoint accumulator has the wrong shape or non-finite values; it is corrupt")
        deltas: dict[int, SparseDelta] = {}
        for v in np.asarray(state["delta_rounds"], dtype=np.int64).tolist():
            deltas[int(v)] = SparseDelta(
                base_round=int(v),
                indices=np.asarray(state[f"delta.{v}.indices"], dtype=np.uint32),
                values=np.asarray(state[f"delta.{v}.values"], dtype=np.float32),
            )
        importance = SeedImportance(self.num_seeds, clip=self.importance.clip)
        importance.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("pro.")})
        self.aggregator.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("agg.")})
        nodes = np.asarray(state["node_ids"], dtype=np.int64).tolist()
        rounds = np.asarray(state["node_rounds"], dtype=np.int64).tolist()
        # Everything parsed: now replace.
        self.accumulator = accumulator
        self.round_deltas = deltas
        self.importance = importance
        self.node_versions = {int(n): int(r) for n, r in zip(nodes, rounds, strict=True)}
        self.completed_round = int(state["completed_round"])  # type: ignore[arg-type]
