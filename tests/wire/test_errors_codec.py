"""Typed client errors: the enum mirrors the proto, round trips, held_version presence, rejections."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from fedtune._proto.v1 import runtime_pb2 as pb
from fedtune.wire import (
    ERROR_SCHEMA_VERSION,
    MAX_ERROR_MESSAGE_CHARS,
    ClientErrorPayload,
    ErrorCode,
    PayloadError,
    decode_client_error,
    encode_client_error,
)


def _raw(**fields: Any) -> bytes:
    """A ClientError built field by field, bypassing the payload's validation."""
    base: dict[str, Any] = {"schema_version": ERROR_SCHEMA_VERSION, "server_round": 3, "code": 1}
    base.update(fields)
    return pb.ClientError(**base).SerializeToString()


# ----------------------------------------------------------------------------- enum mirror
def test_error_code_mirrors_the_proto_enum() -> None:
    proto = {name.removeprefix("ERROR_CODE_"): value for name, value in pb.ErrorCode.items()}
    assert proto.pop("UNSPECIFIED") == 0
    assert {c.name: c.value for c in ErrorCode} == proto
    assert [int(c) for c in ErrorCode] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
@pytest.mark.parametrize("held_version", [None, 0, 5, 2**32 - 1])
def test_round_trip(code: ErrorCode, held_version: int | None) -> None:
    payload = ClientErrorPayload(3, code, f"{code.name} happened", held_version=held_version)

    decoded = decode_client_error(encode_client_error(payload))

    assert decoded == payload
    assert type(decoded.code) is ErrorCode and decoded.code is code
    assert decoded.held_version == held_version


def test_absent_and_zero_held_version_differ_on_the_wire() -> None:
    absent = encode_client_error(ClientErrorPayload(3, ErrorCode.STALE_SYNC, "x"))
    zero = encode_client_error(ClientErrorPayload(3, ErrorCode.STALE_SYNC, "x", held_version=0))

    assert not pb.ClientError.FromString(absent).HasField("held_version")
    assert pb.ClientError.FromString(zero).HasField("held_version")
    assert decode_client_error(absent).held_version is None
    assert decode_client_error(zero).held_version == 0


def test_exact_encoding() -> None:
    # schema_version (2) + server_round (2) + code (2) + message "x" (3) [+ held_version (2)]
    without = encode_client_error(ClientErrorPayload(3, ErrorCode.STALE_SYNC, "x"))
    with_held = encode_client_error(ClientErrorPayload(3, ErrorCode.STALE_SYNC, "x", held_version=2))
    assert without == b'\x08\x01\x10\x03\x18\x02"\x01x'
    assert with_held == without + b"(\x02"


def test_plain_and_numpy_ints_become_error_codes() -> None:
    assert ClientErrorPayload(1, 2, "m").code is ErrorCode.STALE_SYNC  # type: ignore[arg-type]
    assert ClientErrorPayload(1, np.int64(4), "m").code is ErrorCode.BAD_NODE_CONFIG  # type: ignore[arg-type]


def test_empty_message_round_trips() -> None:
    payload = ClientErrorPayload(0, ErrorCode.BAD_PAYLOAD, "")
    assert decode_client_error(encode_client_error(payload)) == payload


# ----------------------------------------------------------------------------- message handling
def test_message_is_truncated_to_the_limit() -> None:
    exact = "e" * MAX_ERROR_MESSAGE_CHARS
    assert ClientErrorPayload(1, ErrorCode.CLIENT_EXCEPTION, exact).message == exact
    long = ClientErrorPayload(1, ErrorCode.CLIENT_EXCEPTION, "é" * 5000)
    assert long.message == "é" * MAX_ERROR_MESSAGE_CHARS
    assert decode_client_error(encode_client_error(long)) == long


def test_decode_truncates_an_over_long_message_instead_of_refusing() -> None:
    decoded = decode_client_error(_raw(message="z" * 5000))
    assert decoded.message == "z" * MAX_ERROR_MESSAGE_CHARS


def test_unencodable_surrogates_are_escaped_not_fatal() -> None:
    payload = ClientErrorPayload(1, ErrorCode.BAD_NODE_CONFIG, "path /data/\udcff missing")
    assert payload.message == "path /data/\\udcff missing"
    assert decode_client_error(encode_client_error(payload)) == payload


def test_payload_is_frozen_and_compares_by_value() -> None:
    payload = ClientErrorPayload(1, ErrorCode.STALE_SYNC, "m", held_version=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        payload.code = ErrorCode.BAD_PAYLOAD  # type: ignore[misc]
    assert payload == ClientErrorPayload(1, ErrorCode.STALE_SYNC, "m", held_version=0)
    assert payload != ClientErrorPayload(1, ErrorCode.STALE_SYNC, "m")
    assert hash(payload) == hash(ClientErrorPayload(1, ErrorCode.STALE_SYNC, "m", held_version=0))


# ----------------------------------------------------------------------------- constructor validation
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"code": 0}, "code=0 is not a known ErrorCode"),
        ({"code": 5}, r"code=5 is not a known ErrorCode \(CLIENT_EXCEPTION=1, STALE_SYNC=2"),
        ({"code": True}, "code must be an ErrorCode, got bool"),
        ({"code": "STALE_SYNC"}, "code must be an ErrorCode, got str"),
        ({"code": 2.0}, "code must be an ErrorCode, got float"),
        ({"message": None}, "message must be a str, got NoneType"),
        ({"message": b"bytes"}, "message must be a str, got bytes"),
        ({"server_round": -1}, "server_round=-1 is outside"),
        ({"held_version": -1}, "held_version=-1 is outside"),
        ({"held_version": 2**32}, "held_version=4294967296 is outside"),
        ({"held_version": True}, "held_version must be an int"),
    ],
    ids=repr,
)
def test_payload_validation(kw: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"server_round": 1, "code": ErrorCode.STALE_SYNC, "message": "m"}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ClientErrorPayload(**args)


def test_encoder_argument_error() -> None:
    with pytest.raises(TypeError, match="ClientErrorPayload"):
        encode_client_error("STALE_SYNC")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- untrusted bytes
_GOOD = encode_client_error(ClientErrorPayload(3, ErrorCode.STALE_SYNC, "stale", held_version=2))

DECODE_CASES: list[tuple[str, bytes, str]] = [
    ("garbage", b"\xff\xff\xff", "malformed ClientError protobuf"),
    ("truncated", _GOOD[:-1], "malformed ClientError protobuf"),
    ("truncated-message", _GOOD[:-4], "malformed ClientError protobuf"),
    ("invalid-utf8", _raw() + b'"\x01\xff', "malformed ClientError protobuf"),
    ("empty", b"", "schema_version 0 is not supported"),
    ("future-version", _raw(schema_version=2), "schema_version 2 is not supported"),
    ("code-unspecified", _raw(code=0), "invalid ClientError: code=0 is not a known ErrorCode"),
    ("code-unknown", _raw(code=9), "invalid ClientError: code=9 is not a known ErrorCode"),
]


@pytest.mark.parametrize(("data", "match"), [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_decode_rejects_untrusted_input(data: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        decode_client_error(data)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="expects bytes"):
        decode_client_error("x")  # type: ignore[arg-type]


def test_schema_version_on_the_wire() -> None:
    assert pb.ClientError.FromString(_GOOD).schema_version == ERROR_SCHEMA_VERSION
