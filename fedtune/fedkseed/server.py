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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import Aggregator, ClientUpdate, StateValue
from fedtune.algorithms.base import EvalModel, NodeReply, RoundOutcome, ServerAlgorithm
from fedtune.algorithms.rounds import MAX_NUM_EXAMPLES, RoundBook, secure_mean, under_prefix, with_prefix
from fedtune.fedkseed.dp import ServerPrivacy
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

COEFFICIENTS = "coefficients"
STATE_VERSION = 2
SYNC_HISTORY_ROUNDS = 64
"""Rounds of accumulator changes kept for sparse syncs. A node whose last confirmed round is older is
forgotten and synced relative to zero, so server memory stays bounded however long the run."""


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
    # bincount adds in the order of the steps, as np.add.at does, several times faster.
    weights = -lr * np.asarray(grads, dtype=np.float64)
    counts = np.bincount(np.asarray(seed_indices, dtype=np.int64), weights=weights, minlength=num_seeds)
    return counts.astype(np.float64, copy=False)


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
        privacy: ServerPrivacy | None = None,
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
        self.privacy = privacy
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
        # A sync depends on the node only through the round it is relative to: build each once.
        by_base: dict[int, bytes] = {}
        payloads: dict[int, bytes] = {}
        for n in node_ids:
            base = self.node_versions.get(n, 0)
            if base not in by_base:
                by_base[base] = encode_sync(self.make_sync(n, settings))
            payloads[n] = by_base[base]
        self._sent = (server_round, set(payloads))
        return payloads

    def forget_node(self, node_id: int) -> None:
        """Next sync to this node is relative to zero."""
        self.node_versions.pop(node_id, None)

    def _delta_since(self, base_round: int) -> SparseDelta:
        """A now minus A at the start of ``base_round`` (rounds without an update add nothing)."""
        if base_round <= 1:  # relative to zero: A itself, whatever history has been pruned
            total = self.accumulator.copy()
        else:
            total = np.zeros(self.num_seeds, dtype=np.float64)
            for v, d in self.round_deltas.items():
                if v >= base_round:
                    np.add.at(total, d.indices.astype(np.int64), d.values.astype(np.float64))
        idx = np.flatnonzero(total).astype(np.uint32)
        return SparseDelta(base_round=base_round, indices=idx, values=total[idx].astype(np.float32))

    # -- upload --------------------------------------------------------------------------------
    def validate_reply(
        self, payload: bytes, settings: RoundSettings, *, summed: bool = False
    ) -> ReplyPayload | str:
        """Decode and check one reply; a string says why it cannot count.

        ``summed``: the public part of a securely aggregated reply (its scalars are in the sum).
        """
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
        dense = self.privacy is not None and self.privacy.plan(reply.num_examples).dense_reply
        if summed:
            if n:
                return "a securely aggregated reply must not carry its scalars in the clear"
        elif dense:
            if n != self.num_seeds or not np.array_equal(reply.seed_indices, np.arange(self.num_seeds)):
                return f"client-level DP noised at the client needs all {self.num_seeds} seeds, got {n}"
        elif n + reply.num_skipped_steps != settings.num_local_steps:
            return f"{n} steps + {reply.num_skipped_steps} skipped != {settings.num_local_steps} asked"
        if self.privacy is not None:
            problem = self.privacy.check_figures(reply.dp, self.privacy.plan(reply.num_examples).figures())
            if problem is not None:
                return problem
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

    def _admit(
        self, server_round: int, replies: Sequence[NodeReply], settings: RoundSettings, *, summed: bool
    ) -> tuple[RoundBook, dict[int, ReplyPayload]]:
        """Validate every reply; book the valid ones (as dense K-vectors unless ``summed``)."""
        sent_round, sent = self._sent
        book = RoundBook(server_round, expected=sent if sent_round == server_round else set())
        steps: dict[int, ReplyPayload] = {}
        for r in replies:
            self._note_error(r, server_round)
            payload = book.admit(r)
            if payload is None:
                continue
            result = self.validate_reply(payload, settings, summed=summed)
            if isinstance(result, str):
                book.reject(r.node_id, result)
                continue
            coef = coefficients_from_steps(
                result.seed_indices, result.projected_grads, lr=settings.lr, num_seeds=self.num_seeds
            )
            if not np.isfinite(coef).all() or np.abs(coef).max(initial=0.0) > np.finfo(np.float32).max:
                book.reject(r.node_id, "coefficients overflow float32")
                continue
            # A summed reply's vector is in the secure sum; the book only counts it (and its loss).
            arrays = (
                {"summed": np.zeros(1, np.float32)} if summed else {COEFFICIENTS: coef.astype(np.float32)}
            )
            update = ClientUpdate(r.node_id, result.num_examples, arrays)
            book.accept(update, train_loss=result.train_loss, peak_memory_mb=result.peak_memory_mb)
            steps[r.node_id] = result
        if self.privacy is not None:  # released is released, whether or not the round applies
            self.privacy.record({n: self.privacy.plan(p.num_examples).figures() for n, p in steps.items()})
        return book, steps

    def _metrics(self, book: RoundBook, steps: Mapping[int, ReplyPayload], lr: float) -> dict[str, float]:
        metrics: dict[str, float] = {
            **book.metrics(),
            "skipped_steps": sum(p.num_skipped_steps for p in steps.values()),
            "lr": lr,
            "seeds_touched": 0,
        }
        if self.privacy is not None:
            metrics.update(self.privacy.metrics())
        return metrics

    def aggregate(self, server_round: int, replies: Sequence[NodeReply], *, min_replies: int) -> RoundOutcome:
        """Validate all replies, aggregate the valid ones and update the state atomically."""
        settings = self.settings(server_round)
        book, steps = self._admit(server_round, replies, settings, summed=False)
        metrics = self._metrics(book, steps, settings.lr)
        glob = book.aggregate(
            self.aggregator,
            min_replies=min_replies,
            shapes={COEFFICIENTS: (self.num_seeds,)},
            max_weight_ratio=self.max_weight_ratio,
        )
        if isinstance(glob, str):
            return book.outcome(metrics, note=glob)
        delta = np.asarray(glob.arrays[COEFFICIENTS], dtype=np.float64)
        kept = sorted(steps if glob.kept is None else glob.kept)
        return self._apply(server_round, book, steps, delta, kept, metrics, settings.lr)

    def summand_length(self, server_round: int) -> int:
        return self.num_seeds

    def aggregate_sum(
        self,
        server_round: int,
        weighted_sum: npt.NDArray[np.float64],
        total_weight: float,
        replies: Sequence[NodeReply],
        *,
        min_replies: int,
    ) -> RoundOutcome:
        """Apply a secure round: the sum holds each survivor's lr-folded K-vector times its weight."""
        settings = self.settings(server_round)
        book, steps = self._admit(server_round, replies, settings, summed=True)
        metrics = self._metrics(book, steps, settings.lr)
        survivors = sum(1 for r in replies if r.payload is not None)
        mean = secure_mean(
            book,
            weighted_sum,
            total_weight,
            survivors=survivors,
            min_replies=max(min_replies, self.aggregator.min_clients),
            length=self.num_seeds,
        )
        if isinstance(mean, str):
            return book.outcome(metrics, note=mean)
        # float32, as every aggregator returns: the accumulator then stays what the float32 sync
        # sends, and a node whose model holds A replays nothing (float64 residues would make it
        # replay every non-zero seed each round).
        mean = mean.astype(np.float32).astype(np.float64)
        return self._apply(server_round, book, steps, mean, sorted(steps), metrics, settings.lr)

    def _apply(
        self,
        server_round: int,
        book: RoundBook,
        steps: Mapping[int, ReplyPayload],
        delta: npt.NDArray[np.float64],
        kept: Sequence[int],
        metrics: dict[str, float],
        lr: float,
    ) -> RoundOutcome:
        noise = None if self.privacy is None else self.privacy.server_noise()
        if noise is not None:  # client-level DP at a trusted server: noise on the sum, then the mean
            delta = delta - lr * noise / max(1, len(book.accepted))
        # Everything validated: now mutate.
        self.accumulator += delta
        self.completed_round = server_round
        idx = np.flatnonzero(delta).astype(np.uint32)
        self.round_deltas[server_round] = SparseDelta(
            base_round=server_round, indices=idx, values=delta[idx].astype(np.float32)
        )
        for node in steps:  # each accepted node holds A as of this round's start
            self.node_versions[node] = server_round
        self._prune_history()
        if self.pro:  # seed importance learns only from the updates the aggregator kept
            for node in kept:
                self.importance.update(steps[node].seed_indices, steps[node].projected_grads)
        metrics["seeds_touched"] = int(idx.size)
        return book.outcome(metrics)

    def _prune_history(self) -> None:
        """Drop round deltas no node's sparse sync can need, and nodes older than the kept history."""
        horizon = self.completed_round + 1 - SYNC_HISTORY_ROUNDS
        for node in [n for n, v in self.node_versions.items() if v < horizon]:
            self.forget_node(node)
        oldest = min(self.node_versions.values(), default=self.completed_round + 1)
        for v in [v for v in self.round_deltas if v < oldest]:
            del self.round_deltas[v]

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
        state.update(with_prefix("pro", self.importance.state_dict()))
        state.update(with_prefix("agg", self.aggregator.state_dict()))
        if self.privacy is not None:
            state.update(self.privacy.state_dict())
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
        importance.load_state_dict(under_prefix("pro", state))
        ledger = None if self.privacy is None else self.privacy.ledger_from_state(state)
        self.aggregator.load_state_dict(under_prefix("agg", state))
        nodes = np.asarray(state["node_ids"], dtype=np.int64).tolist()
        rounds = np.asarray(state["node_rounds"], dtype=np.int64).tolist()
        # Everything parsed: now replace.
        self.accumulator = accumulator
        self.round_deltas = deltas
        self.importance = importance
        if self.privacy is not None and ledger is not None:
            self.privacy.ledger = ledger
        self.node_versions = {int(n): int(r) for n, r in zip(nodes, rounds, strict=True)}
        self.completed_round = int(state["completed_round"])  # type: ignore[arg-type]
