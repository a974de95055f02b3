"""The split server's protocol: every request checked before the trunk moves; labels only where
the variant allows them; a client that vanishes mid-step leaves the trunk consistent."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from fedtune._proto.v1 import split_pb2 as pb
from fedtune.sap.channel import ChannelError, SplitChannelServer, StepError
from fedtune.sap.channel_client import SplitChannelClient
from fedtune.sap.service import ModelShape, SplitService, StreamSession
from fedtune.sap.split import build_split
from fedtune.sap.tensors import from_tensor, to_tensor
from fedtune.sap.trunk import SHARED, TrunkTrainer, add_trunk_lora

B, S, D = 2, 6, 384


def _service(u_shaped: bool = False, token_ids: bool = False) -> SplitService:
    parts = build_split("minilm-l6", "classification", 0, num_layers=2, num_classes=2, seed=0)
    trunk = add_trunk_lora(parts.trunk, rank=2, alpha=4, targets=(), seed=0)
    trainer = TrunkTrainer(trunk, None if u_shaped else parts.head, lr=1e-3)
    shape = ModelShape(D, 30522, 2, 16, u_shaped=u_shaped, token_ids=token_ids)
    service = SplitService(trainer, shape)
    service.open(StreamSession("s", 1, 0, SHARED))
    return service


def _acts(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, S, D)).astype("<f4") * 0.05


def _train(
    step: int = 0, *, labels: bool = True, acts: np.ndarray | None = None, **fields: Any
) -> pb.StepRequest:
    req = pb.StepRequest(
        stream_id="s",
        step=step,
        kind=pb.STEP_KIND_TRAIN,
        activations=to_tensor(_acts() if acts is None else acts),
        attention_mask=to_tensor(np.ones((B, S), "|u1")),
        **fields,
    )
    if labels:
        req.labels.CopyFrom(to_tensor(np.array([0, 1], "<i8")))
    return req


def _weights(service: SplitService) -> dict[str, torch.Tensor]:
    return {n: w.clone() for n, w in service.trainer.slot(SHARED).weights.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


def test_standard_train_step_returns_a_loss_and_moves_the_trunk() -> None:
    service = _service()
    before = _weights(service)
    reply = service("s", _train())
    assert reply.loss > 0 and reply.trunk_steps == 1
    assert not _same(before, _weights(service))
    assert service.session("s").steps_done == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (lambda: _train(step=3), "expected step 0"),
        (lambda: _train(labels=False), "no labels"),
        (lambda: _train(acts=np.zeros((B, S, 8), "<f4")), "width 8"),
        (lambda: _train(acts=np.full((B, S, D), np.nan, "<f4")), "finite"),
        (lambda: _train(acts=np.zeros((B, 17, D), "<f4")), "outside"),
        (lambda: pb.StepRequest(stream_id="s", step=0, kind=pb.STEP_KIND_UNSPECIFIED), "not TRAIN"),
        (lambda: pb.StepRequest(stream_id="s", step=0, kind=pb.STEP_KIND_BACKWARD), "U-shaped"),
    ],
    ids=["step", "labels", "width", "nan", "length", "kind", "backward"],
)
def test_bad_requests_are_refused_before_the_trunk_moves(request_: Any, match: str) -> None:
    service = _service()
    before = _weights(service)
    with pytest.raises(StepError, match=match):
        service("s", request_())
    assert _same(before, _weights(service))


def test_bad_labels_and_masks_are_refused() -> None:
    service = _service()
    req = _train(labels=False)
    req.labels.CopyFrom(to_tensor(np.array([0, 5], "<i8")))
    with pytest.raises(StepError, match="class ids"):
        service("s", req)
    req = _train()
    req.attention_mask.CopyFrom(to_tensor(np.zeros((B, S), "|u1")))
    with pytest.raises(StepError, match="a token in every row"):
        service("s", req)


def test_unknown_stream_is_refused() -> None:
    with pytest.raises(StepError, match="not open"):
        _service()("other", _train())


def test_u_shaped_split_refuses_labels_and_trains_from_the_clients_gradient() -> None:
    service = _service(u_shaped=True)
    with pytest.raises(StepError, match="keeps the labels on the client"):
        service("s", _train())
    before = _weights(service)
    reply = service("s", _train(labels=False))
    out = from_tensor(reply.trunk_output, name="out", dtypes=("<f4",), ndim=2)
    assert out.shape == (B, D) and _same(before, _weights(service))  # forward only
    grad = to_tensor(np.ones((B, D), "<f4"))
    service("s", pb.StepRequest(stream_id="s", step=0, kind=pb.STEP_KIND_BACKWARD, upstream_grad=grad))
    assert not _same(before, _weights(service))
    assert service.session("s").steps_done == 1  # type: ignore[union-attr]


def test_predict_changes_nothing() -> None:
    service = _service()
    before = _weights(service)
    req = _train(labels=False)
    req.kind = pb.STEP_KIND_PREDICT
    reply = service("s", req)
    preds = from_tensor(reply.predictions, name="p", dtypes=("<i8",), ndim=1)
    assert preds.shape == (B,) and set(preds.tolist()) <= {0, 1}
    assert _same(before, _weights(service))


def test_text_variant_takes_token_ids_in_range() -> None:
    service = _service(token_ids=True)
    req = _train(acts=np.zeros((B, S, D), "<f4"))
    with pytest.raises(StepError, match="dtype"):
        service("s", req)
    req.activations.CopyFrom(to_tensor(np.full((B, S), 99999, "<i8")))
    with pytest.raises(StepError, match="token ids"):
        service("s", req)
    req.activations.CopyFrom(to_tensor(np.full((B, S), 2000, "<i8")))
    assert service("s", req).loss > 0


def test_a_client_dropped_between_forward_and_backward_leaves_the_trunk_consistent() -> None:
    """Over the real channel: the U-shaped client vanishes after its TRAIN reply, before BACKWARD."""
    service = _service(u_shaped=True)
    ended = threading.Event()

    def on_end(stream_id: str, clean: bool) -> None:
        service.on_stream_end(stream_id, clean)
        ended.set()

    with SplitChannelServer(service, on_stream_end=on_end) as server:
        address = server.address
        server.authorize("s", "a" * 64)
        before = _weights(service)
        client = SplitChannelClient(address, stream_id="s", token="a" * 64, timeout_s=30)
        client.step(_train(labels=False))
        client.cancel()  # the connection drops mid-step
        assert ended.wait(10)
        assert service.session("s").pending is None  # type: ignore[union-attr]
        assert _same(before, _weights(service))
        # The trunk still serves: a new stream of the same session cannot replay the lost step...
        again = SplitChannelClient(address, stream_id="s", token="a" * 64, timeout_s=30)
        grad = to_tensor(np.ones((B, D), "<f4"))
        with pytest.raises(ChannelError, match="without its TRAIN step"):
            again.step(pb.StepRequest(stream_id="s", step=0, kind=pb.STEP_KIND_BACKWARD, upstream_grad=grad))
        again.close()
        # ...but goes on with the next one.
        third = SplitChannelClient(address, stream_id="s", token="a" * 64, timeout_s=30)
        third.step(_train(step=1, labels=False))
        third.step(pb.StepRequest(stream_id="s", step=1, kind=pb.STEP_KIND_BACKWARD, upstream_grad=grad))
        third.close()
        assert not _same(before, _weights(service))
