"""SAP round payloads: exact round trips, and every defect refused with a clear error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedtune.sap.codec import (
    SplitReplyPayload,
    SplitRoundPayload,
    decode_split_reply,
    decode_split_round,
    encode_split_reply,
    encode_split_round,
)
from fedtune.wire.codec import PayloadError

ROUND = SplitRoundPayload(
    server_round=3,
    address="127.0.0.1:50051",
    stream_id="r3-c1-abcd",
    token="ab" * 32,
    steps=10,
    batch_size=16,
    class_names=("negative", "positive"),
    root_certificates=b"-----BEGIN CERTIFICATE-----\n...",
    head={"linear.weight": np.ones((2, 4), np.float32), "linear.bias": np.zeros(2, np.float32)},
)
REPLY = SplitReplyPayload(
    server_round=3,
    steps_done=10,
    num_examples=120,
    train_loss=0.5,
    bytes_up_per_step=1e5,
    bytes_down_per_step=12.0,
    step_ms=3.5,
    noised_norm=1.1,
    noise_norm=3.8,
    peak_memory_mb=800.0,
)


def test_round_trips_are_exact() -> None:
    assert decode_split_round(encode_split_round(ROUND)) == ROUND
    assert decode_split_reply(encode_split_reply(REPLY)) == REPLY
    plain = dataclasses.replace(ROUND, head={}, class_names=(), root_certificates=b"")
    assert decode_split_round(encode_split_round(plain)) == plain


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"address": "no-port"}, "host:port"),
        ({"token": "XYZ"}, "hex"),
        ({"steps": 0}, "steps"),
        ({"class_names": ("only",)}, "class_names"),
        ({"head": {"w": np.full(2, np.nan, np.float32)}}, "NaN"),
    ],
)
def test_bad_round_payloads_raise(change: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(ROUND, **change)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "match"), [({"num_examples": 0}, "num_examples"), ({"step_ms": -1.0}, ">= 0")]
)
def test_bad_replies_raise(change: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(REPLY, **change)  # type: ignore[arg-type]


def test_corrupt_bytes_are_payload_errors() -> None:
    with pytest.raises(PayloadError):
        decode_split_round(b"\xff\x00garbage")
    with pytest.raises(PayloadError):
        decode_split_reply(encode_split_round(ROUND)[:7])
