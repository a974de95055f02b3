"""LoRA-FedAvg server half: the global adapter, reply validation, aggregation of adapter deltas.

Clients return their updated adapter weights (FedIT). The server validates them, turns them into
deltas against the global adapter, and hands the deltas to the configured aggregator: with the
weighted mean this is exactly FedAvg on the weights, and robust aggregators see updates rather
than raw weights, as they expect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import Aggregator, ClientUpdate, StateValue
from fedtune.algorithms.base import EvalModel, NodeReply, RoundOutcome, ServerAlgorithm
from fedtune.algorithms.rounds import MAX_NUM_EXAMPLES, RoundBook, secure_mean, under_prefix, with_prefix
from fedtune.lora.dp import LoRAServerPrivacy
from fedtune.wire.codec import PayloadError
from fedtune.wire.dp_report import DPFigures
from fedtune.wire.lora_codec import (
    AdapterReplyPayload,
    AdapterSyncPayload,
    decode_adapter_reply,
    encode_adapter_sync,
)

STATE_VERSION = 1
AdapterArrays = dict[str, npt.NDArray[np.float32]]
# The one placeholder array of a securely aggregated reply: its update is inside the secure sum.
SUMMED = "secagg.summed"


class LoRAFedAvgServer(ServerAlgorithm):
    """Global adapter weights plus the aggregator; state changes only after full validation."""

    def __init__(
        self,
        global_arrays: Mapping[str, npt.NDArray[np.float32]],
        aggregator: Aggregator,
        *,
        max_weight_ratio: float = 10.0,
        eval_model: Callable[[AdapterArrays], EvalModel] | None = None,
        privacy: LoRAServerPrivacy | None = None,
    ) -> None:
        self.global_arrays: AdapterArrays = {
            k: np.asarray(v, np.float32).copy() for k, v in global_arrays.items()
        }
        self.aggregator = aggregator
        self.max_weight_ratio = max_weight_ratio
        self._eval_model = eval_model
        self.privacy = privacy
        self.completed_round = 0
        self._sent: tuple[int, set[int]] = (0, set())

    @property
    def min_updates(self) -> int:
        return self.aggregator.min_clients

    def describe(self) -> str:
        size = sum(a.size for a in self.global_arrays.values())
        return f"LoRA-FedAvg (FedIT): {len(self.global_arrays)} adapter tensors, {size:,} parameters"

    def configure(self, server_round: int, node_ids: Sequence[int]) -> dict[int, bytes]:
        payload = encode_adapter_sync(
            AdapterSyncPayload(server_round=server_round, arrays=self.global_arrays)
        )
        self._sent = (server_round, set(node_ids))
        return dict.fromkeys(node_ids, payload)

    def validate(
        self, payload: bytes, server_round: int, *, summed: bool = False
    ) -> AdapterReplyPayload | str:
        """Decode and check one reply (``summed``: the public part of a securely aggregated one)."""
        try:
            reply = decode_adapter_reply(payload)
        except PayloadError as exc:
            return f"malformed payload: {exc}"
        if reply.server_round != server_round:
            return f"reply is for round {reply.server_round}, expected {server_round}"
        if not 0 < reply.num_examples <= MAX_NUM_EXAMPLES:
            return f"absurd num_examples {reply.num_examples}"
        if summed:
            if list(reply.arrays) != [SUMMED] or reply.arrays[SUMMED].size != 1:
                return "a securely aggregated reply must not carry its adapter in the clear"
        elif list(reply.arrays) != list(self.global_arrays):
            return "adapter names differ from the global adapter"
        for name, ref in ({} if summed else self.global_arrays).items():
            if reply.arrays[name].shape != ref.shape:
                return f"adapter {name} has shape {reply.arrays[name].shape}, expected {ref.shape}"
        if self.privacy is not None:
            problem = self.privacy.check(reply.dp, reply.num_examples)
            if problem is not None:
                return problem
        return reply

    def _admit(
        self, server_round: int, replies: Sequence[NodeReply], *, summed: bool
    ) -> tuple[RoundBook, dict[str, float]]:
        """Validate every reply, book the valid ones (as deltas unless ``summed``), account for DP."""
        sent_round, sent = self._sent
        book = RoundBook(server_round, expected=sent if sent_round == server_round else set())
        released: dict[int, DPFigures] = {}
        for r in replies:
            payload = book.admit(r)
            if payload is None:
                continue
            res = self.validate(payload, server_round, summed=summed)
            if isinstance(res, str):
                book.reject(r.node_id, res)
                continue
            if summed:  # the update is inside the secure sum; the book counts the reply
                deltas = dict(res.arrays)
            else:
                deltas = {
                    k: (res.arrays[k] - ref).astype(np.float32) for k, ref in self.global_arrays.items()
                }
                if self.privacy is not None and res.dp is not None:
                    deltas = self.privacy.server_clip(deltas)
            if res.dp is not None:
                released[r.node_id] = res.dp
            update = ClientUpdate(r.node_id, res.num_examples, deltas)
            book.accept(update, train_loss=res.train_loss, peak_memory_mb=res.peak_memory_mb)
        metrics: dict[str, float] = dict(book.metrics())
        if self.privacy is not None:  # released is released, whether or not the round applies
            self.privacy.record(released)
            metrics.update(self.privacy.metrics())
        return book, metrics

    def aggregate(self, server_round: int, replies: Sequence[NodeReply], *, min_replies: int) -> RoundOutcome:
        book, metrics = self._admit(server_round, replies, summed=False)
        glob = book.aggregate(
            self.aggregator,
            min_replies=min_replies,
            shapes={k: v.shape for k, v in self.global_arrays.items()},
            max_weight_ratio=self.max_weight_ratio,
        )
        if isinstance(glob, str):
            return book.outcome(metrics, note=glob)
        step = {k: np.asarray(glob.arrays[k], np.float64) for k in self.global_arrays}
        return self._apply(server_round, book, step, metrics)

    def summand_length(self, server_round: int) -> int:
        return int(sum(a.size for a in self.global_arrays.values()))

    def aggregate_sum(
        self,
        server_round: int,
        weighted_sum: npt.NDArray[np.float64],
        total_weight: float,
        replies: Sequence[NodeReply],
        *,
        min_replies: int,
    ) -> RoundOutcome:
        """Apply a secure round: the sum holds each survivor's flattened adapter update times its weight."""
        book, metrics = self._admit(server_round, replies, summed=True)
        mean = secure_mean(
            book,
            weighted_sum,
            total_weight,
            survivors=sum(1 for r in replies if r.payload is not None),
            min_replies=max(min_replies, self.aggregator.min_clients),
            length=self.summand_length(server_round),
        )
        if isinstance(mean, str):
            return book.outcome(metrics, note=mean)
        step: dict[str, npt.NDArray[np.float64]] = {}
        offset = 0
        for k, ref in self.global_arrays.items():
            step[k] = mean[offset : offset + ref.size].reshape(ref.shape)
            offset += ref.size
        return self._apply(server_round, book, step, metrics)

    def _apply(
        self,
        server_round: int,
        book: RoundBook,
        step: dict[str, npt.NDArray[np.float64]],
        metrics: dict[str, float],
    ) -> RoundOutcome:
        noise = (
            None if self.privacy is None else self.privacy.server_noise({k: v.shape for k, v in step.items()})
        )
        if noise is not None:  # client-level DP at a trusted server: noise on the sum, then the mean
            n = max(1, len(book.accepted))
            step = {k: v + noise[k] / n for k, v in step.items()}
        self.global_arrays = {k: (ref + step[k]).astype(np.float32) for k, ref in self.global_arrays.items()}
        self.completed_round = server_round
        return book.outcome(metrics)

    def eval_model(self) -> EvalModel | None:
        return None if self._eval_model is None else self._eval_model(self.global_arrays)

    def state_dict(self) -> dict[str, StateValue]:
        state: dict[str, StateValue] = {
            "version": STATE_VERSION,
            "completed_round": self.completed_round,
            "names": "\n".join(self.global_arrays),
        }
        state.update(with_prefix("adapter", {k: v.copy() for k, v in self.global_arrays.items()}))
        state.update(with_prefix("agg", self.aggregator.state_dict()))
        if self.privacy is not None:
            state.update(self.privacy.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"LoRA-FedAvg state version {state.get('version')!r} is not {STATE_VERSION}")
        names = str(state.get("names", "")).split("\n")
        if names != list(self.global_arrays):
            raise ValueError(
                "checkpoint adapter names differ from this run's; resume with the same model and lora.*"
            )
        arrays: AdapterArrays = {}
        for name, ref in self.global_arrays.items():
            arr = np.asarray(state[f"adapter.{name}"], dtype=np.float32)
            if arr.shape != ref.shape or not np.isfinite(arr).all():
                raise ValueError(f"checkpoint adapter {name} has shape {arr.shape} or non-finite values")
            arrays[name] = arr.copy()
        ledger = None if self.privacy is None else self.privacy.ledger_from_state(state)
        self.aggregator.load_state_dict(under_prefix("agg", state))
        if self.privacy is not None and ledger is not None:
            self.privacy.ledger = ledger
        self.global_arrays = arrays
        self.completed_round = int(state["completed_round"])  # type: ignore[arg-type]
