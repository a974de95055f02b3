"""DeComFL's server half: round seeds, per-seed aggregation, the history, per-node sync versions.

The server never moves weights. Its state is the history of aggregated rounds
``(round, seeds, aggregated scalars, lr)``; the global model is
``theta_0 + sum over the history of -(lr / P) * scalar * z(seed)`` (:class:`SeedCoefficients`).
Every reply is validated before anything changes: a rejected reply, a round below
``min_replies`` or an aggregator refusal leaves the state exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import Aggregator, ClientUpdate, StateValue
from fedtune.algorithms import EvalModel, NodeReply, RoundOutcome, ServerAlgorithm
from fedtune.algorithms.rounds import MAX_NUM_EXAMPLES, RoundBook
from fedtune.wire.errors import ErrorCode
from fedtune.zo import MAX_SEED_INDEX

from .payload import (
    MAX_SCALARS_PER_ROUND,
    HistoryEntry,
    PayloadError,
    ReplyPayload,
    SyncPayload,
    decode_reply,
    encode_sync,
)
from .replica import SeedCoefficients

DECOMFL_SEED_TAG = 0xDEC0_3F1
"""Domain-separates the server's seed draws from every other use of the run seed."""
SCALARS = "scalars"
STATE_VERSION = 1


def round_seeds(run_seed: int, server_round: int, count: int) -> npt.NDArray[np.uint32]:
    """The round's ``count`` distinct seed indices, from a generator keyed by (tag, run seed, round).

    Indices address :class:`fedtune.zo.Perturbation`'s whole seed space ``[0, MAX_SEED_INDEX)``;
    a repeat across rounds is harmless (coefficients add up), within a round it is redrawn.
    """
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([DECOMFL_SEED_TAG, run_seed, server_round]))
    )
    out: list[int] = []
    seen: set[int] = set()
    while len(out) < count:
        for s in rng.integers(0, MAX_SEED_INDEX, size=count - len(out), dtype=np.int64).tolist():
            if s not in seen:
                seen.add(s)
                out.append(s)
    return np.asarray(out, dtype=np.uint32)


@dataclass(frozen=True)
class _Sent:
    server_round: int
    nodes: frozenset[int]
    seeds: npt.NDArray[np.uint32]
    lr: float
    catch_up_rounds: int


class DeComFLServer(ServerAlgorithm):
    """The server half: round seeds, per-seed aggregation, the history and per-node sync versions.

    ``node_versions[n]`` is the global model version node ``n`` confirmed holding (its last
    accepted reply for round r confirms version r - 1, the model it trained from; a STALE_SYNC
    error names the version it does hold). A node's payload carries the history after that
    version, so a node that missed rounds catches up from the next payload it gets.
    """

    def __init__(
        self,
        *,
        aggregator: Aggregator,
        fingerprint: str,
        run_seed: int,
        num_local_steps: int,
        num_perturbations: int,
        batch_size: int,
        eps: float,
        lr_at: Callable[[int], float],
        max_weight_ratio: float = 10.0,
        eval_model: Callable[[SeedCoefficients], EvalModel] | None = None,
        export: Callable[[SeedCoefficients, Path], None] | None = None,
    ) -> None:
        if num_local_steps < 1 or num_perturbations < 1:
            raise ValueError("num_local_steps and num_perturbations must be >= 1")
        if num_local_steps * num_perturbations > MAX_SCALARS_PER_ROUND:
            raise ValueError(f"local steps x perturbations must be <= {MAX_SCALARS_PER_ROUND}")
        self.aggregator = aggregator
        self.fingerprint = fingerprint
        self.run_seed = run_seed
        self.num_local_steps = num_local_steps
        self.num_perturbations = num_perturbations
        self.batch_size = batch_size
        self.eps = eps
        self.lr_at = lr_at
        self.max_weight_ratio = max_weight_ratio
        self._eval_model = eval_model
        self._export = export
        self.history: list[HistoryEntry] = []
        self.global_coefficients = SeedCoefficients()
        self.node_versions: dict[int, int] = {}
        self.completed_round = 0
        self._sent: _Sent | None = None

    @property
    def num_scalars(self) -> int:
        return self.num_local_steps * self.num_perturbations

    @property
    def min_updates(self) -> int:
        return self.aggregator.min_clients

    def describe(self) -> str:
        agg = self.aggregator.name or type(self.aggregator).__name__
        return (
            f"DeComFL: {self.num_local_steps} local steps x {self.num_perturbations} perturbation(s), "
            f"server-drawn seeds, aggregator={agg}"
        )

    # -- download ------------------------------------------------------------------------------
    def make_sync(
        self, node_id: int, server_round: int, seeds: npt.NDArray[np.uint32], lr: float
    ) -> SyncPayload:
        base = self.node_versions.get(node_id, 0)
        if base >= server_round:  # cannot happen through the loop; resend everything
            base = 0
        return SyncPayload(
            server_round=server_round,
            base_round=base,
            num_local_steps=self.num_local_steps,
            num_perturbations=self.num_perturbations,
            batch_size=self.batch_size,
            lr=lr,
            eps=self.eps,
            fingerprint=self.fingerprint,
            seeds=seeds,
            entries=tuple(e for e in self.history if e.server_round > base),
        )

    def configure(self, server_round: int, node_ids: Sequence[int]) -> dict[int, bytes]:
        seeds = round_seeds(self.run_seed, server_round, self.num_scalars)
        lr = self.lr_at(server_round)
        syncs = {n: self.make_sync(n, server_round, seeds, lr) for n in node_ids}
        self._sent = _Sent(
            server_round,
            frozenset(syncs),
            seeds,
            lr,
            max((len(s.entries) for s in syncs.values()), default=0),
        )
        return {n: encode_sync(s) for n, s in syncs.items()}

    # -- upload --------------------------------------------------------------------------------
    def validate_reply(self, payload: bytes, server_round: int) -> ReplyPayload | str:
        """Decode and check one reply; a string says why it cannot count."""
        try:
            reply = decode_reply(payload)
        except PayloadError as exc:
            return f"malformed payload: {exc}"
        if reply.server_round != server_round:
            return f"reply is for round {reply.server_round}, expected {server_round}"
        if reply.synced_round != server_round - 1:
            return (
                f"reply trained from version {reply.synced_round}, "
                f"the global model is version {server_round - 1}"
            )
        if reply.scalars.size != self.num_scalars:
            return f"{reply.scalars.size} scalars, expected tau * P = {self.num_scalars}"
        if not 0 < reply.num_examples <= MAX_NUM_EXAMPLES:
            return f"absurd num_examples {reply.num_examples}"
        return reply

    def aggregate(self, server_round: int, replies: Sequence[NodeReply], *, min_replies: int) -> RoundOutcome:
        """Validate every reply, aggregate the valid scalars per seed, then (only then) update state."""
        sent = self._sent
        if sent is None or sent.server_round != server_round:  # nothing was sent for this round
            sent = _Sent(server_round, frozenset(), np.zeros(0, np.uint32), self.lr_at(server_round), 0)
        book = RoundBook(server_round, expected=set(sent.nodes))
        stale: dict[int, int | None] = {}
        skipped_steps = 0
        for r in replies:
            first = r.node_id in sent.nodes and r.node_id not in book.seen
            payload = book.admit(r)
            if payload is None:
                if first and r.error is not None and r.error.code == ErrorCode.STALE_SYNC:
                    stale[r.node_id] = r.error.held_version  # applied only if the round is
                continue
            result = self.validate_reply(payload, server_round)
            if isinstance(result, str):
                book.reject(r.node_id, result)
                continue
            update = ClientUpdate(r.node_id, result.num_examples, {SCALARS: result.scalars})
            book.accept(update, train_loss=result.train_loss, peak_memory_mb=result.peak_memory_mb)
            skipped_steps += result.num_skipped
        metrics: dict[str, int | float] = {
            **book.metrics(),
            "skipped_steps": skipped_steps,
            "lr": sent.lr,
            "scalars_per_reply": self.num_scalars,
            "catch_up_rounds": sent.catch_up_rounds,
            "stale_nodes": len(stale),
        }
        glob = book.aggregate(
            self.aggregator,
            min_replies=min_replies,
            shapes={SCALARS: (self.num_scalars,)},
            max_weight_ratio=self.max_weight_ratio,
        )
        if isinstance(glob, str):
            return book.outcome(metrics, note=glob)
        try:
            entry = HistoryEntry(server_round, sent.lr, sent.seeds.copy(), np.array(glob.arrays[SCALARS]))
        except PayloadError as exc:
            return book.outcome(metrics, note=f"aggregated round is unusable: {exc}")
        if not np.isfinite(entry.coefficients(self.num_perturbations)).all():
            return book.outcome(metrics, note="aggregated coefficients overflow")
        # Everything validated: now mutate.
        self.history.append(entry)
        self.global_coefficients.add_entry(entry, self.num_perturbations)
        self.completed_round = server_round
        for n in book.node_ids:  # each accepted node trained from (and saved) version server_round - 1
            self.node_versions[n] = server_round - 1
        for n, held in stale.items():  # resend from what the node says it holds, or from theta_0
            if held is not None and 0 < held < server_round:
                self.node_versions[n] = held
            else:
                self.node_versions.pop(n, None)
        metrics["history_rounds"] = len(self.history)
        return book.outcome(metrics)

    def eval_model(self) -> EvalModel | None:
        return None if self._eval_model is None else self._eval_model(self.global_coefficients)

    def export(self, out_dir: Path) -> None:
        if self._export is None:
            super().export(out_dir)
        else:
            self._export(self.global_coefficients, out_dir)

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, StateValue]:
        """History, node versions and the aggregator's state, as arrays and scalars."""
        nodes = sorted(self.node_versions)
        n = self.num_scalars
        state: dict[str, StateValue] = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "run_seed": self.run_seed,
            "num_local_steps": self.num_local_steps,
            "num_perturbations": self.num_perturbations,
            "completed_round": self.completed_round,
            "history.rounds": np.asarray([e.server_round for e in self.history], dtype=np.int64),
            "history.lrs": np.asarray([e.lr for e in self.history], dtype=np.float64),
            "history.seeds": np.asarray([e.seeds for e in self.history], dtype=np.uint32).reshape(-1, n),
            "history.scalars": np.asarray([e.scalars for e in self.history], dtype=np.float32).reshape(-1, n),
            "node_ids": np.asarray(nodes, dtype=np.int64),
            "node_versions": np.asarray([self.node_versions[k] for k in nodes], dtype=np.int64),
        }
        state.update({f"agg.{k}": v for k, v in self.aggregator.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore :meth:`state_dict` of the same run configuration (ValueError otherwise)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"DeComFL state version {state.get('version')!r} is not {STATE_VERSION}; "
                "resume with the examples/decomfl version that wrote the checkpoint"
            )
        mine = (self.fingerprint, self.run_seed, self.num_local_steps, self.num_perturbations)
        theirs = tuple(
            state.get(k) for k in ("fingerprint", "run_seed", "num_local_steps", "num_perturbations")
        )
        if theirs != mine:
            raise ValueError(
                f"checkpoint is for (fingerprint, run seed, local steps, perturbations) = "
                f"({str(theirs[0])[:12]}, {theirs[1]}, {theirs[2]}, {theirs[3]}), this run has "
                f"({self.fingerprint[:12]}, {self.run_seed}, {self.num_local_steps}, "
                f"{self.num_perturbations}); "
                "resume with the same model and config"
            )
        try:
            rounds = np.asarray(state["history.rounds"], dtype=np.int64).tolist()
            lrs = np.asarray(state["history.lrs"], dtype=np.float64).tolist()
            seeds = np.asarray(state["history.seeds"])
            scalars = np.asarray(state["history.scalars"])
            if (
                seeds.shape != (len(rounds), self.num_scalars)
                or scalars.shape != seeds.shape
                or len(lrs) != len(rounds)
            ):
                raise ValueError("history arrays disagree in shape")
            history = [
                HistoryEntry(int(r), float(lr), seeds[i].astype(np.uint32), scalars[i].astype(np.float32))
                for i, (r, lr) in enumerate(zip(rounds, lrs, strict=True))
            ]
            if rounds != sorted(set(rounds)):
                raise ValueError("history rounds are not strictly increasing")
            completed = int(state["completed_round"])  # type: ignore[arg-type]
            nodes = np.asarray(state["node_ids"], dtype=np.int64).tolist()
            versions = np.asarray(state["node_versions"], dtype=np.int64).tolist()
            if len(nodes) != len(versions):
                raise ValueError("node_ids and node_versions differ in length")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"DeComFL checkpoint is corrupt: {exc}") from exc
        coefficients = SeedCoefficients()
        for e in history:
            coefficients.add_entry(e, self.num_perturbations)
        self.aggregator.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("agg.")})
        # Everything parsed: now replace.
        self.history = history
        self.global_coefficients = coefficients
        self.completed_round = completed
        self.node_versions = {int(n): int(v) for n, v in zip(nodes, versions, strict=True)}
        self._sent = None
