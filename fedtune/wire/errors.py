"""Typed client errors (``proto/fedtune/v1/runtime.proto``), shared by every algorithm.

A client that cannot reply sends a :class:`ClientErrorPayload` instead, so the server can act on a
code (resync a stale node, drop a bad payload) rather than parse free-form text. The bytes travel
inside a Flower ``ConfigRecord``; this module never imports Flower. Decoded bytes are untrusted and
any defect raises :class:`PayloadError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np

from fedtune._proto.v1 import runtime_pb2 as pb
from fedtune.wire._validate import check_uint
from fedtune.wire.codec import PayloadError, _parse

ERROR_SCHEMA_VERSION: Final = 1
ERROR_SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({ERROR_SCHEMA_VERSION})
MAX_ERROR_MESSAGE_CHARS: Final = 2000


class ErrorCode(IntEnum):
    """Why a client could not reply; values equal the ``fedtune.v1.ErrorCode`` proto enum."""

    CLIENT_EXCEPTION = 1  # local training/evaluation raised
    STALE_SYNC = 2  # the sync is relative to state this node does not hold (see held_version)
    BAD_PAYLOAD = 3  # the server's payload failed to decode or validate
    BAD_NODE_CONFIG = 4  # the node config (partition id, paths, ...) is missing or invalid


def _check_code(value: object) -> ErrorCode:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"code must be an ErrorCode, got {type(value).__name__}")
    try:
        return ErrorCode(int(value))
    except ValueError:
        known = ", ".join(f"{c.name}={c.value}" for c in ErrorCode)
        raise ValueError(
            f"code={int(value)} is not a known ErrorCode ({known}); "
            "the sender runs a newer fedtune or did not set the code"
        ) from None


def _clean_message(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"message must be a str, got {type(value).__name__}; pass str(exc)")
    # Lone surrogates (e.g. from os.fsdecode) cannot be encoded as UTF-8; escape them rather than fail
    # while reporting another failure.
    text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:MAX_ERROR_MESSAGE_CHARS]


@dataclass(frozen=True)
class ClientErrorPayload:
    """Client -> server in place of a reply (message ``ClientError``).

    code: a non-zero :class:`ErrorCode` (plain ints are converted). message: detail for the log,
    truncated to 2000 characters so an error report never grows unbounded. held_version: for
    STALE_SYNC, the round whose state the node holds, or None when it holds nothing.
    """

    server_round: int
    code: ErrorCode
    message: str
    held_version: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "server_round", check_uint("server_round", self.server_round))
        set_(self, "code", _check_code(self.code))
        set_(self, "message", _clean_message(self.message))
        if self.held_version is not None:
            set_(self, "held_version", check_uint("held_version", self.held_version))


def encode_client_error(p: ClientErrorPayload) -> bytes:
    """Serialize a :class:`ClientErrorPayload` to ``ClientError`` bytes (held_version only when set)."""
    if not isinstance(p, ClientErrorPayload):
        raise TypeError(f"encode_client_error expects a ClientErrorPayload, got {type(p).__name__}")
    msg = pb.ClientError(
        schema_version=ERROR_SCHEMA_VERSION,
        server_round=p.server_round,
        code=f"ERROR_CODE_{p.code.name}",  # by name: a mirror out of step with the proto fails loudly
        message=p.message,
    )
    if p.held_version is not None:
        msg.held_version = p.held_version
    return msg.SerializeToString()


def decode_client_error(b: bytes) -> ClientErrorPayload:
    """Parse and validate untrusted ``ClientError`` bytes; an over-long message is truncated, not refused.

    Raises :class:`PayloadError` on malformed bytes, an unknown schema_version or an unknown code.
    """
    msg = _parse(b, pb.ClientError(), supported=ERROR_SUPPORTED_SCHEMA_VERSIONS)
    try:
        return ClientErrorPayload(
            server_round=msg.server_round,
            code=_check_code(int(msg.code)),
            message=msg.message,
            held_version=msg.held_version if msg.HasField("held_version") else None,
        )
    except ValueError as exc:
        raise PayloadError(f"invalid ClientError: {exc}") from exc
