"""fedtune payloads inside Flower records: the runtime envelope of every algorithm's bytes.

Down: ``fedtune`` ConfigRecord with ``round``, ``run-key`` and the payload (bytes; payloads
above :data:`INLINE_LIMIT` travel as a uint8 ``Array`` instead, which Flower chunks).
Up: ``fedtune`` ConfigRecord with ``payload`` or ``error`` (a ``ClientError`` protobuf).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedtune.algorithms.base import NodeReply
from fedtune.wire.codec import PayloadError
from fedtune.wire.errors import ClientErrorPayload, ErrorCode, decode_client_error, encode_client_error

RECORD = "fedtune"
BLOB = "fedtune-blob"
PAYLOAD = "payload"
ERROR = "error"
# Flower chunks Arrays (5 MB) but not ConfigRecord values; big payloads (LoRA adapters) go as an Array.
INLINE_LIMIT = 512 * 1024


@dataclass(frozen=True)
class Envelope:
    """What a train message carries besides the payload."""

    server_round: int
    run_key: str
    payload: bytes


def _put(payload: bytes) -> RecordDict:
    if len(payload) <= INLINE_LIMIT:
        return RecordDict({RECORD: ConfigRecord({PAYLOAD: payload})})
    return RecordDict({BLOB: ArrayRecord({PAYLOAD: Array(np.frombuffer(payload, dtype=np.uint8))})})


def _get(content: RecordDict) -> bytes | None:
    if BLOB in content.array_records:
        arrays = content.array_records[BLOB]
        if PAYLOAD not in arrays:
            raise ValueError(f"{BLOB!r} record has no {PAYLOAD!r} array")
        arr = arrays[PAYLOAD].numpy()
        if arr.dtype != np.uint8 or arr.ndim != 1:
            raise ValueError(f"{BLOB}.{PAYLOAD} must be a 1-D uint8 array, got {arr.ndim}-D {arr.dtype}")
        return arr.tobytes()
    record = content.config_records.get(RECORD)
    value = None if record is None else record.get(PAYLOAD)
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise ValueError(f"{RECORD}.{PAYLOAD} must be bytes, got {type(value).__name__}")
    return value


def train_content(envelope: Envelope) -> RecordDict:
    content = _put(envelope.payload)
    content[f"{RECORD}-meta"] = ConfigRecord({"round": envelope.server_round, "run-key": envelope.run_key})
    return content


def envelope_from(message: Message) -> Envelope:
    """The envelope of a train message (ValueError naming what is wrong: it is untrusted input)."""
    content = message.content
    meta = content.config_records.get(f"{RECORD}-meta")
    if meta is None:
        raise ValueError(f"train message has no {RECORD}-meta record (got {sorted(content.keys())})")
    rnd, key = meta.get("round"), meta.get("run-key")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0 or not isinstance(key, str):
        raise ValueError(f"{RECORD}-meta must hold an int round and a str run-key, got {rnd!r}, {key!r}")
    payload = _get(content)
    if payload is None:
        raise ValueError("train message carries no payload")
    return Envelope(rnd, key, payload)


def reply_content(result: bytes | ClientErrorPayload) -> RecordDict:
    if isinstance(result, ClientErrorPayload):
        return RecordDict({RECORD: ConfigRecord({ERROR: encode_client_error(result)})})
    return _put(result)


def reply_from(message: Message, client_id: int, server_round: int) -> NodeReply:
    """A Flower reply as a :class:`NodeReply`; Flower errors and malformed content become typed errors."""

    def error(code: ErrorCode, text: str) -> NodeReply:
        return NodeReply(client_id, error=ClientErrorPayload(server_round, code, text))

    if message.has_error():
        return error(ErrorCode.CLIENT_EXCEPTION, f"Flower error {message.error.code}: {message.error.reason}")
    try:
        record = message.content.config_records.get(RECORD)
        if record is not None and ERROR in record:
            raw = record[ERROR]
            if not isinstance(raw, bytes):
                raise ValueError(f"{RECORD}.{ERROR} must be bytes")
            return NodeReply(client_id, error=decode_client_error(raw))
        payload = _get(message.content)
    except (ValueError, PayloadError) as exc:
        return error(ErrorCode.BAD_PAYLOAD, f"malformed reply: {exc}")
    if payload is None:
        return error(ErrorCode.BAD_PAYLOAD, "reply carries neither a payload nor an error")
    return NodeReply(client_id, payload=payload)


def message_nbytes(message: Message) -> int:
    """Bytes of Flower's whole serialized message: every inflatable object it is sent as."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
