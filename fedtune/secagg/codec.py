"""Protobuf encoding of the secure-aggregation messages (``proto/fedtune/v1/secagg.proto``).

Every message travels inside a :class:`Stage`-tagged ``SecAggEnvelope`` with an opaque ``inner``
payload for the runtime (the algorithm's own bytes, at the MASK stage). A reply carries the stage of
the request it answers, and the envelope's ``reply`` flag tells the two messages of a stage apart:

=========  ==================  ==================
Stage      request (server)    reply (client)
=========  ==================  ==================
SETUP      SetupRequest        KeysReply
KEYS       KeysBroadcast       SharesReply
SHARES     (none: the routed shares ride with the MASK request)
MASK       MaskRequest         MaskedInput
UNMASK     UnmaskRequest       UnmaskReply
=========  ==================  ==================

Everything decoded is untrusted: malformed bytes, an unknown schema version or stage, wrong key, share,
ciphertext or vector lengths raise :class:`SecAggPayloadError` naming the problem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Any, Final, TypeVar

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as PbMessage

from fedtune._proto.v1 import secagg_pb2 as pb
from fedtune.secagg.errors import SecAggPayloadError as SecAggPayloadError  # raised here, so importable here
from fedtune.secagg.messages import (
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
from fedtune.secagg.shamir import share_from_bytes, share_to_bytes

SECAGG_SCHEMA_VERSION: Final = 1
SECAGG_SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({SECAGG_SCHEMA_VERSION})
_WORD: Final = np.dtype("<u8")

_P = TypeVar("_P", bound=PbMessage)


class Stage(IntEnum):
    """Which message an envelope carries (see the module table); values equal the wire ``stage``."""

    SETUP = 1
    KEYS = 2
    SHARES = 3
    MASK = 4
    UNMASK = 5


REQUESTS: Final[dict[Stage, type[Message]]] = {
    Stage.SETUP: SetupRequest,
    Stage.KEYS: KeysBroadcast,
    Stage.MASK: MaskRequest,
    Stage.UNMASK: UnmaskRequest,
}
REPLIES: Final[dict[Stage, type[Message]]] = {
    Stage.SETUP: KeysReply,
    Stage.KEYS: SharesReply,
    Stage.MASK: MaskedInput,
    Stage.UNMASK: UnmaskReply,
}


# ----------------------------------------------------------------------------- envelope
def encode_envelope(stage: Stage, body: Message, inner: bytes = b"") -> bytes:
    """``SecAggEnvelope`` bytes of ``body`` (the stage's request or reply) and the opaque ``inner``."""
    stage = Stage(stage)
    if type(body) is REQUESTS.get(stage):
        reply = False
    elif type(body) is REPLIES.get(stage):
        reply = True
    else:
        raise ValueError(
            f"a {type(body).__name__} does not travel at stage {stage.name}; see the stage table in "
            "fedtune.secagg.codec"
        )
    if not isinstance(inner, bytes | bytearray):
        raise ValueError(f"inner must be bytes, got {type(inner).__name__}")
    env = pb.SecAggEnvelope(
        schema_version=SECAGG_SCHEMA_VERSION,
        stage=int(stage),
        body=encode_message(body),
        inner=bytes(inner),
        reply=reply,
    )
    data: bytes = env.SerializeToString()
    return data


def decode_envelope(
    data: object, *, expect_reply: bool | None = None, vector_length: int | None = None
) -> tuple[Stage, Message, bytes]:
    """``(stage, message, inner)`` from untrusted envelope bytes.

    ``expect_reply`` (when given) refuses the wrong direction; ``vector_length`` (when given) is checked
    against a :class:`MaskedInput`'s vector.
    """
    env = _parse(data, pb.SecAggEnvelope())
    try:
        stage = Stage(env.stage)
    except ValueError:
        raise SecAggPayloadError(f"unknown secagg stage {env.stage}; expected 1..5") from None
    direction = "reply" if env.reply else "request"
    if expect_reply is not None and env.reply != expect_reply:
        raise SecAggPayloadError(
            f"got a secagg {direction} where a {'reply' if expect_reply else 'request'} belongs"
        )
    kind = (REPLIES if env.reply else REQUESTS).get(stage)
    if kind is None:
        raise SecAggPayloadError(f"no secagg {direction} travels at stage {stage.name}")
    return stage, decode_message(kind, env.body, vector_length=vector_length), env.inner


# ----------------------------------------------------------------------------- messages
def encode_message(msg: Message) -> bytes:
    """The bare protobuf bytes of one stage message (the envelope's ``body``)."""
    data: bytes = to_pb(msg).SerializeToString()
    return data


def decode_message(kind: type[Message], data: object, *, vector_length: int | None = None) -> Message:
    """Parse and validate untrusted ``data`` as a ``kind`` message."""
    pb_type, convert = _FROM_PB[kind]
    parsed = _parse(data, pb_type())
    try:
        msg = convert(parsed)
    except (ValueError, TypeError) as exc:
        raise SecAggPayloadError(f"invalid {kind.__name__}: {exc}") from exc
    if vector_length is not None and isinstance(msg, MaskedInput) and msg.masked.size != vector_length:
        raise SecAggPayloadError(
            f"MaskedInput from node {msg.node_id} has {msg.masked.size} words, expected {vector_length}"
        )
    return msg


def to_pb(msg: Message) -> Any:
    """The protobuf message of a dataclass message (also used for the client's state)."""
    v = SECAGG_SCHEMA_VERSION
    if isinstance(msg, SetupRequest):
        return pb.SecAggSetup(
            schema_version=v,
            run_key=msg.run_key,
            server_round=msg.server_round,
            participants=msg.participants,
            threshold=msg.threshold,
            vector_length=msg.vector_length,
            fraction_bits=msg.fraction_bits,
            clip=msg.clip,
        )
    if isinstance(msg, KeysReply):
        return pb.SecAggKeysReply(
            schema_version=v, node_id=msg.node_id, c_public=msg.c_public, s_public=msg.s_public
        )
    if isinstance(msg, KeysBroadcast):
        keys = [
            pb.SecAggNodeKeys(node_id=k.node_id, c_public=k.c_public, s_public=k.s_public) for k in msg.keys
        ]
        return pb.SecAggKeysBroadcast(schema_version=v, keys=keys)
    if isinstance(msg, SharesReply):
        return pb.SecAggSharesReply(
            schema_version=v, node_id=msg.node_id, ciphertexts=cts_to_pb(msg.ciphertexts)
        )
    if isinstance(msg, MaskRequest):
        return pb.SecAggMaskRequest(
            schema_version=v, participants_u2=msg.participants_u2, ciphertexts=cts_to_pb(msg.ciphertexts)
        )
    if isinstance(msg, MaskedInput):
        masked = msg.masked.astype(_WORD, copy=False).tobytes()
        return pb.SecAggMaskedInput(schema_version=v, node_id=msg.node_id, masked=masked, clipped=msg.clipped)
    if isinstance(msg, UnmaskRequest):
        return pb.SecAggUnmaskRequest(schema_version=v, survivors=msg.survivors, dropped=msg.dropped)
    if isinstance(msg, UnmaskReply):
        return pb.SecAggUnmaskReply(
            schema_version=v, node_id=msg.node_id, b_shares=_shares_to_pb(msg.b_shares),
            s_shares=_shares_to_pb(msg.s_shares),
        )  # fmt: skip
    raise TypeError(f"not a secagg message: {type(msg).__name__}")


def setup_from_pb(m: pb.SecAggSetup) -> SetupRequest:
    return SetupRequest(
        run_key=m.run_key,
        server_round=m.server_round,
        participants=tuple(m.participants),
        threshold=m.threshold,
        vector_length=m.vector_length,
        fraction_bits=m.fraction_bits,
        clip=m.clip,
    )


def keys_from_pb(m: pb.SecAggKeysBroadcast) -> KeysBroadcast:
    return KeysBroadcast(tuple(NodeKeys(k.node_id, k.c_public, k.s_public) for k in m.keys))


def cts_to_pb(items: Iterable[tuple[int, bytes]]) -> list[pb.SecAggCiphertext]:
    return [pb.SecAggCiphertext(node_id=node, ciphertext=ct) for node, ct in items]


def cts_from_pb(items: Iterable[pb.SecAggCiphertext]) -> tuple[tuple[int, bytes], ...]:
    return tuple((c.node_id, c.ciphertext) for c in items)


def _shares_to_pb(items: Iterable[tuple[int, int]]) -> list[pb.SecAggShare]:
    return [pb.SecAggShare(node_id=node, share=share_to_bytes(y)) for node, y in items]


def _shares_from_pb(items: Iterable[pb.SecAggShare]) -> tuple[tuple[int, int], ...]:
    return tuple((s.node_id, share_from_bytes(s.share)) for s in items)


def _masked_from_pb(m: pb.SecAggMaskedInput) -> MaskedInput:
    if len(m.masked) % _WORD.itemsize:
        raise ValueError(f"masked holds {len(m.masked)} bytes, not a whole number of uint64 words")
    words = np.frombuffer(m.masked, dtype=_WORD).astype(np.uint64)
    return MaskedInput(node_id=m.node_id, masked=words, clipped=m.clipped)


_FROM_PB: Final[dict[type[Message], tuple[type[Any], Callable[[Any], Message]]]] = {
    SetupRequest: (pb.SecAggSetup, setup_from_pb),
    KeysReply: (pb.SecAggKeysReply, lambda m: KeysReply(m.node_id, m.c_public, m.s_public)),
    KeysBroadcast: (pb.SecAggKeysBroadcast, keys_from_pb),
    SharesReply: (pb.SecAggSharesReply, lambda m: SharesReply(m.node_id, cts_from_pb(m.ciphertexts))),
    MaskRequest: (
        pb.SecAggMaskRequest,
        lambda m: MaskRequest(tuple(m.participants_u2), cts_from_pb(m.ciphertexts)),
    ),
    MaskedInput: (pb.SecAggMaskedInput, _masked_from_pb),
    UnmaskRequest: (pb.SecAggUnmaskRequest, lambda m: UnmaskRequest(tuple(m.survivors), tuple(m.dropped))),
    UnmaskReply: (
        pb.SecAggUnmaskReply,
        lambda m: UnmaskReply(m.node_id, _shares_from_pb(m.b_shares), _shares_from_pb(m.s_shares)),
    ),
}


def _parse(data: object, message: _P) -> _P:
    """Parse untrusted ``data`` into ``message``; refuse non-bytes, corrupt bytes and unknown versions."""
    name = type(message).__name__
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SecAggPayloadError(f"{name} must arrive as bytes, got {type(data).__name__}")
    try:
        message.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise SecAggPayloadError(f"malformed {name} protobuf ({exc}); the bytes are corrupt") from exc
    version = getattr(message, "schema_version", None)
    if version not in SECAGG_SUPPORTED_SCHEMA_VERSIONS:
        raise SecAggPayloadError(
            f"{name} schema_version {version} is not supported (this fedtune reads "
            f"{sorted(SECAGG_SUPPORTED_SCHEMA_VERSIONS)}); the bytes are empty/not a {name}, or the sender "
            "runs another fedtune version: upgrade the older side"
        )
    return message


def parse_state(data: object) -> pb.SecAggClientState:
    """Parse a client's saved state (see :meth:`fedtune.secagg.protocol.SecAggClient.from_bytes`)."""
    return _parse(data, pb.SecAggClientState())
