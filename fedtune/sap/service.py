"""The split server's step handler: one session per (round, client) stream, every request checked.

The channel (:mod:`fedtune.sap.channel`) authenticates the stream; this module decides what a
request may contain and runs it on the :class:`~fedtune.sap.trunk.TrunkTrainer`. A request that
breaks the protocol (wrong step number, labels in a U-shaped split, shapes that do not match the
model, non-finite values) is refused with :class:`StepError` before the trunk is touched.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from fedtune._proto.v1 import split_pb2 as pb
from fedtune.sap.channel import StepError
from fedtune.sap.tensors import from_tensor, to_tensor
from fedtune.sap.trunk import TrunkTrainer

FLOAT_DTYPES = ("<f4", "<f2")
MAX_BATCH = 4096


@dataclass
class StreamSession:
    """What the server knows of one client's stream this round."""

    stream_id: str
    server_round: int
    client_id: int
    slot: str
    next_step: int = 0
    steps_done: int = 0
    pending: tuple[int, torch.Tensor, torch.Tensor] | None = None  # U-shaped: TRAIN awaiting BACKWARD


@dataclass(frozen=True)
class ModelShape:
    """What requests must agree with: the model's sizes and the split's variant."""

    hidden_size: int
    vocab_size: int
    num_classes: int  # 0 for causal LM
    max_length: int
    u_shaped: bool
    token_ids: bool  # the text-level variant sends token ids instead of representations


class SplitService:
    """Callable as the channel's step handler: ``(stream_id, StepRequest) -> StepReply``."""

    def __init__(self, trainer: TrunkTrainer, shape: ModelShape) -> None:
        self.trainer, self.shape = trainer, shape
        self._sessions: dict[str, StreamSession] = {}
        self._lock = threading.Lock()

    # -- sessions ------------------------------------------------------------------------------
    def open(self, session: StreamSession) -> None:
        with self._lock:
            self._sessions[session.stream_id] = session

    def session(self, stream_id: str) -> StreamSession | None:
        with self._lock:
            return self._sessions.get(stream_id)

    def close_all(self) -> dict[str, StreamSession]:
        with self._lock:
            closed, self._sessions = self._sessions, {}
        return closed

    def on_stream_end(self, stream_id: str, clean: bool) -> None:
        """A stream ended (cleanly or not): drop a U-shaped forward still waiting for its gradient."""
        session = self.session(stream_id)
        if session is not None:
            session.pending = None

    # -- requests ------------------------------------------------------------------------------
    def __call__(self, stream_id: str, request: pb.StepRequest) -> pb.StepReply:
        session = self.session(stream_id)
        if session is None:
            raise StepError(f"stream {stream_id!r} is not open this round")
        kind = request.kind
        if kind == pb.STEP_KIND_BACKWARD:
            return self._backward(session, request)
        if kind not in (pb.STEP_KIND_TRAIN, pb.STEP_KIND_PREDICT):
            raise StepError(f"step kind {kind} is not TRAIN, BACKWARD or PREDICT")
        if request.step != session.next_step:
            raise StepError(
                f"step {request.step} arrived, expected step {session.next_step} (lock-step protocol)"
            )
        x, mask = self._inputs(request)
        if kind == pb.STEP_KIND_PREDICT:
            session.next_step += 1
            return self._predict(session, request, x, mask)
        if self.shape.u_shaped:
            if request.HasField("labels"):
                raise StepError("the U-shaped split keeps the labels on the client; send no labels")
            feats = self.trainer.features(session.slot, x, mask)
            session.pending = (request.step, x, mask)
            session.next_step += 1
            return pb.StepReply(
                step=request.step, trunk_output=to_tensor(feats.numpy()), trunk_steps=self._steps(session)
            )
        labels = self._labels(request, x.shape[0], x.shape[1])
        loss = self.trainer.train_step(session.slot, x, mask, labels)
        session.next_step += 1
        session.steps_done += 1
        return pb.StepReply(step=request.step, loss=loss, trunk_steps=self._steps(session))

    def _steps(self, session: StreamSession) -> int:
        return self.trainer.slot(session.slot).steps

    def _predict(
        self, session: StreamSession, request: pb.StepRequest, x: torch.Tensor, mask: torch.Tensor
    ) -> pb.StepReply:
        if self.shape.u_shaped:
            feats = self.trainer.features(session.slot, x, mask)
            return pb.StepReply(
                step=request.step, trunk_output=to_tensor(feats.numpy()), trunk_steps=self._steps(session)
            )
        preds = self.trainer.predict(session.slot, x, mask)
        return pb.StepReply(
            step=request.step,
            predictions=to_tensor(preds.numpy().astype("<i8")),
            trunk_steps=self._steps(session),
        )

    def _backward(self, session: StreamSession, request: pb.StepRequest) -> pb.StepReply:
        if not self.shape.u_shaped:
            raise StepError("BACKWARD steps exist only in the U-shaped split")
        pending = session.pending
        if pending is None or pending[0] != request.step:
            raise StepError(f"BACKWARD for step {request.step} without its TRAIN step")
        step, x, mask = pending
        b, s = x.shape[0], x.shape[1]
        want = (b, self.shape.hidden_size) if self.shape.num_classes else (b, s, self.shape.hidden_size)
        grad = self._array(request, "upstream_grad", FLOAT_DTYPES, len(want))
        if tuple(grad.shape) != want:
            raise StepError(
                f"upstream_grad has shape {tuple(grad.shape)}, expected {want} (the trunk output's)"
            )
        self.trainer.backward_step(session.slot, x, mask, torch.from_numpy(grad.astype(np.float32)))
        session.pending = None
        session.steps_done += 1
        return pb.StepReply(step=step, trunk_steps=self._steps(session))

    # -- validation ----------------------------------------------------------------------------
    @staticmethod
    def _array(request: pb.StepRequest, field: str, dtypes: tuple[str, ...], ndim: int) -> np.ndarray:
        if not request.HasField(field):
            raise StepError(f"the request has no {field}")
        try:
            return from_tensor(getattr(request, field), name=field, dtypes=dtypes, ndim=ndim)
        except ValueError as exc:
            raise StepError(str(exc)) from exc

    def _inputs(self, request: pb.StepRequest) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.shape
        if shape.token_ids:
            ids = self._array(request, "activations", ("<i8",), 2)
            if ids.size and (ids.min() < 0 or ids.max() >= shape.vocab_size):
                raise StepError(f"token ids must be in [0, {shape.vocab_size})")
            x = torch.from_numpy(ids.astype(np.int64))
        else:
            acts = self._array(request, "activations", FLOAT_DTYPES, 3)
            if acts.shape[2] != shape.hidden_size:
                raise StepError(f"activations have width {acts.shape[2]}, the model's is {shape.hidden_size}")
            x = torch.from_numpy(acts.astype(np.float32))
        b, s = x.shape[0], x.shape[1]
        if not (1 <= b <= MAX_BATCH and 1 <= s <= shape.max_length):
            raise StepError(f"batch {b} x {s} tokens is outside 1..{MAX_BATCH} x 1..{shape.max_length}")
        mask = self._array(request, "attention_mask", ("|u1",), 2)
        if mask.shape != (b, s) or not np.isin(mask, (0, 1)).all() or not mask.any(axis=1).all():
            raise StepError(f"attention_mask must be {b} x {s} of 0/1 with a token in every row")
        return x, torch.from_numpy(mask.astype(np.int64))

    def _labels(self, request: pb.StepRequest, b: int, s: int) -> torch.Tensor:
        shape = self.shape
        if shape.num_classes:
            y = self._array(request, "labels", ("<i8",), 1)
            if y.shape != (b,) or y.min() < 0 or y.max() >= shape.num_classes:
                raise StepError(f"labels must be {b} class ids in [0, {shape.num_classes})")
        else:
            y = self._array(request, "labels", ("<i8",), 2)
            ok = (y == -100) | ((y >= 0) & (y < shape.vocab_size))
            if y.shape != (b, s) or not ok.all() or not (y[:, 1:] != -100).any():
                raise StepError(f"labels must be {b} x {s} target ids (-100 = none) with an answer token")
        return torch.from_numpy(y.astype(np.int64))
