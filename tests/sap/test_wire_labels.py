"""What crosses the split channel, per variant (docs/sap.md, "What crosses the wire")."""

from __future__ import annotations

from typing import Any

import pytest

from fedtune._proto.v1 import split_pb2 as pb
from fedtune.flower.testing import run_local
from fedtune.sap.cti import ContributingTokens
from fedtune.sap.service import SplitService


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[pb.StepRequest]:
    """Every StepRequest the split server received, as received."""
    requests: list[pb.StepRequest] = []
    original = SplitService.__call__

    def record(self: SplitService, stream_id: str, request: pb.StepRequest) -> pb.StepReply:
        copy = pb.StepRequest()
        copy.CopyFrom(request)
        requests.append(copy)
        return original(self, stream_id, request)

    monkeypatch.setattr(SplitService, "__call__", record)
    return requests


def _fields(requests: list[pb.StepRequest]) -> list[tuple[int, set[str]]]:
    # Fields set, step included (proto3 omits a zero step from ListFields).
    return [(r.kind, {f.name for f, _ in r.ListFields()} | {"step"}) for r in requests]


def test_standard_split_sends_labels_with_every_train_step(sap_cfg: Any, seen: list[pb.StepRequest]) -> None:
    run_local(sap_cfg(**{"federation.num-rounds": 1}))
    assert len(seen) == 9
    for kind, fields in _fields(seen):
        assert kind == pb.STEP_KIND_TRAIN
        assert fields == {"stream_id", "step", "kind", "activations", "attention_mask", "labels"}


def test_u_shaped_split_sends_no_labels_at_all(sap_cfg: Any, seen: list[pb.StepRequest]) -> None:
    run_local(sap_cfg(**{"federation.num-rounds": 1, "algorithm.options.u-shaped": True}))
    assert len(seen) == 18  # TRAIN (forward) + BACKWARD per step
    for kind, fields in _fields(seen):
        assert "labels" not in fields
        if kind == pb.STEP_KIND_TRAIN:
            assert fields == {"stream_id", "step", "kind", "activations", "attention_mask"}
        else:
            assert kind == pb.STEP_KIND_BACKWARD
            assert fields == {"stream_id", "step", "kind", "upstream_grad"}


@pytest.mark.parametrize(("u_shaped", "by_label"), [(False, True), (True, False)])
def test_cti_noise_follows_the_labels_only_where_the_labels_are_sent(
    sap_cfg: Any, monkeypatch: pytest.MonkeyPatch, u_shaped: bool, by_label: bool
) -> None:
    """Class-conditioned etas would reveal a U-shaped client's labels through its noise levels."""
    labelled: list[bool] = []
    original = ContributingTokens.etas

    def spy(self: ContributingTokens, input_ids: Any, labels: Any) -> Any:
        labelled.append(labels is not None)
        return original(self, input_ids, labels)

    monkeypatch.setattr(ContributingTokens, "etas", spy)
    options = {"algorithm.options.cti": True, "algorithm.options.u-shaped": u_shaped}
    summary, _ = run_local(sap_cfg(**{"federation.num-rounds": 1, **options}))
    assert summary["completed_rounds"] == 1
    assert labelled and all(labelled) is by_label and any(labelled) is by_label


def test_text_variant_sends_token_ids_not_representations(sap_cfg: Any, seen: list[pb.StepRequest]) -> None:
    run_local(sap_cfg(**{"federation.num-rounds": 1, "algorithm.options.variant": "text"}))
    assert seen and all(r.activations.dtype == "<i8" and len(r.activations.shape) == 2 for r in seen)


def test_float16_wire_halves_the_activation_bytes(sap_cfg: Any, seen: list[pb.StepRequest]) -> None:
    run_local(sap_cfg(**{"federation.num-rounds": 1, "algorithm.options.wire-dtype": "float16"}))
    assert seen and all(r.activations.dtype == "<f2" for r in seen)
