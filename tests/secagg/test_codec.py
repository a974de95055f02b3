"""The wire codec: messages round-trip in their envelope; any bad input is a SecAggPayloadError."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from google.protobuf.message import Message as PbMessage

from fedtune._proto.v1 import secagg_pb2 as pb
from fedtune.secagg.codec import Stage, decode_envelope, decode_message, encode_envelope, encode_message
from fedtune.secagg.errors import SecAggPayloadError
from fedtune.secagg.messages import (
    CIPHERTEXT_BYTES,
    KeysBroadcast,
    KeysReply,
    MaskedInput,
    MaskRequest,
    Message,
    NodeKeys,
    SetupRequest,
    SharesReply,
    UnmaskReply,
    UnmaskRequest,
)
from fedtune.secagg.shamir import PRIME

K1, K2, CT = b"\x01" * 32, b"\x02" * 32, b"\x03" * CIPHERTEXT_BYTES
SETUP = SetupRequest("run", 4, (30, 10, 20), 2, 5, 40, 8.0)

CASES: list[tuple[Stage, Message]] = [
    (Stage.SETUP, SETUP),
    (Stage.SETUP, KeysReply(10, K1, K2)),
    (Stage.KEYS, KeysBroadcast((NodeKeys(20, K2, K1), NodeKeys(10, K1, K2)))),
    (Stage.KEYS, SharesReply(10, ((30, CT), (20, CT)))),
    (Stage.MASK, MaskRequest((10, 20, 30), ((20, CT), (30, CT)))),
    (Stage.MASK, MaskedInput(10, np.array([0, 1, 2**64 - 1, 7, 9], dtype=np.uint64), 2)),
    (Stage.UNMASK, UnmaskRequest((10, 20), (30,))),
    (Stage.UNMASK, UnmaskReply(10, ((10, 5), (20, PRIME - 1)), ((30, 0),))),
]


@pytest.mark.parametrize(("stage", "msg"), CASES, ids=[type(m).__name__ for _, m in CASES])
def test_every_message_round_trips_in_its_envelope(stage: Stage, msg: Message) -> None:
    data = encode_envelope(stage, msg, b"algorithm bytes")
    got_stage, got, inner = decode_envelope(data, vector_length=5)
    assert (got_stage, got, inner) == (stage, msg, b"algorithm bytes")
    assert type(got) is type(msg)


def test_setup_sorts_participants_and_gives_shamir_points() -> None:
    assert SETUP.participants == (10, 20, 30)
    assert [SETUP.x_of(n) for n in (10, 20, 30)] == [1, 2, 3]


def test_a_message_at_the_wrong_stage_is_refused_on_encode() -> None:
    with pytest.raises(ValueError, match="does not travel at stage KEYS"):
        encode_envelope(Stage.KEYS, SETUP)


def _envelope(stage: int, body: bytes, *, reply: bool = False, version: int = 1) -> bytes:
    env = pb.SecAggEnvelope(schema_version=version, stage=stage, body=body, reply=reply)
    return env.SerializeToString()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x0a\xff\xff", "malformed"),
        (b"", "schema_version 0"),
        (_envelope(1, b"", version=2), "schema_version 2"),
        (_envelope(9, b""), "unknown secagg stage 9"),
        (_envelope(3, b""), "no secagg request travels at stage SHARES"),
        (_envelope(1, b"\x08\x07"), "SecAggSetup schema_version 7"),
        (_envelope(1, encode_message(KeysReply(10, K1, K2))), "invalid SetupRequest"),
    ],
)
def test_bad_envelopes_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(SecAggPayloadError, match=match):
        decode_envelope(data)


def test_non_bytes_and_wrong_direction_are_refused() -> None:
    with pytest.raises(SecAggPayloadError, match="must arrive as bytes"):
        decode_envelope("text")
    data = encode_envelope(Stage.SETUP, SETUP)
    with pytest.raises(SecAggPayloadError, match="where a reply belongs"):
        decode_envelope(data, expect_reply=True)
    assert decode_envelope(data, expect_reply=False)[1] == SETUP


@pytest.mark.parametrize(
    ("kind", "raw", "match"),
    [
        (
            KeysReply,
            pb.SecAggKeysReply(schema_version=1, node_id=1, c_public=K1[:31], s_public=K2),
            "c_public",
        ),
        (KeysReply, pb.SecAggKeysReply(schema_version=1, node_id=1, c_public=K1, s_public=b""), "s_public"),
        (
            KeysBroadcast,
            pb.SecAggKeysBroadcast(
                schema_version=1, keys=[pb.SecAggNodeKeys(node_id=1, c_public=K1, s_public=K2 * 2)]
            ),
            "s_public",
        ),
        (
            KeysBroadcast,
            pb.SecAggKeysBroadcast(
                schema_version=1,
                keys=[pb.SecAggNodeKeys(node_id=1, c_public=K1, s_public=K2)] * 2,
            ),
            "lists a node twice",
        ),
        (
            SharesReply,
            pb.SecAggSharesReply(
                schema_version=1, node_id=1, ciphertexts=[pb.SecAggCiphertext(node_id=2, ciphertext=CT[1:])]
            ),
            "must be 160 bytes",
        ),
        (MaskedInput, pb.SecAggMaskedInput(schema_version=1, node_id=1, masked=b"\x00" * 12), "whole number"),
        (MaskedInput, pb.SecAggMaskedInput(schema_version=1, node_id=1, masked=b""), "non-empty"),
        (
            MaskedInput,
            pb.SecAggMaskedInput(schema_version=1, node_id=1, masked=b"\x00" * 8, clipped=2),
            "clipped",
        ),
        (UnmaskRequest, pb.SecAggUnmaskRequest(schema_version=1, survivors=[1, 1]), "twice"),
        (
            UnmaskReply,
            pb.SecAggUnmaskReply(
                schema_version=1, node_id=1, b_shares=[pb.SecAggShare(node_id=1, share=b"\x01" * 65)]
            ),
            "66 bytes",
        ),
        (
            UnmaskReply,
            pb.SecAggUnmaskReply(
                schema_version=1,
                node_id=1,
                s_shares=[pb.SecAggShare(node_id=1, share=PRIME.to_bytes(66, "big"))],
            ),
            "share must be an int",
        ),
        (
            SetupRequest,
            pb.SecAggSetup(schema_version=1, run_key="r", participants=[1, 2], threshold=3),
            "threshold",
        ),
        (
            SetupRequest,
            pb.SecAggSetup(
                schema_version=1,
                run_key="r",
                participants=[1, 2],
                threshold=2,
                vector_length=4,
                fraction_bits=62,
                clip=8.0,
            ),
            "overflows",
        ),
    ],
)
def test_invalid_messages_are_refused(kind: type[Message], raw: PbMessage, match: str) -> None:
    with pytest.raises(SecAggPayloadError, match=match):
        decode_message(kind, raw.SerializeToString())


def test_wrong_vector_length_is_refused() -> None:
    msg = MaskedInput(10, np.arange(5, dtype=np.uint64), 0)
    data = encode_envelope(Stage.MASK, msg)
    with pytest.raises(SecAggPayloadError, match="has 5 words, expected 6"):
        decode_envelope(data, vector_length=6)
    assert decode_envelope(data)[1] == msg


def test_masked_vector_is_little_endian_words() -> None:
    msg = MaskedInput(10, np.array([1, 2**63], dtype=np.uint64), 0)
    raw = pb.SecAggMaskedInput.FromString(encode_message(msg)).masked
    assert raw == (1).to_bytes(8, "little") + (2**63).to_bytes(8, "little")


def test_decoded_vectors_are_read_only() -> None:
    msg = decode_message(MaskedInput, encode_message(CASES[5][1]))
    assert isinstance(msg, MaskedInput)
    with pytest.raises(ValueError):
        msg.masked[0] = 1
    assert dataclasses.replace(msg, clipped=0) != msg
