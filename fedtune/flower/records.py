"""fedtune payloads inside Flower records: protobuf bytes in one ConfigRecord entry."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

RECORD = "fedtune"
PAYLOAD = "payload"


def payload_content(payload: bytes) -> RecordDict:
    """Wrap a project-encoded payload (see ``proto/``) for a Flower message."""
    return RecordDict({RECORD: ConfigRecord({PAYLOAD: payload})})


def payload_from(message: Message) -> bytes:
    """Extract the payload bytes; a ValueError names what is missing (untrusted input)."""
    content = message.content
    if RECORD not in content.config_records:
        raise ValueError(f"message has no {RECORD!r} ConfigRecord (got {sorted(content.keys())})")
    record = content.config_records[RECORD]
    if PAYLOAD not in record:
        raise ValueError(f"{RECORD!r} record has no {PAYLOAD!r} entry")
    value = record[PAYLOAD]
    if not isinstance(value, bytes):
        raise ValueError(f"{RECORD}.{PAYLOAD} must be bytes, got {type(value).__name__}")
    return value


def message_nbytes(message: Message) -> int:
    """Bytes of Flower's whole serialized message: every inflatable object it is sent as."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
