"""Wire formats: typed payloads <-> bytes, free of Flower (the Flower adapter carries the bytes)."""

from fedtune.wire.codec import (
    FP16_MAX,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    PayloadError,
    ReplyPayload,
    ScalarDtypeName,
    SparseDelta,
    SyncPayload,
    decode_reply,
    decode_sync,
    encode_reply,
    encode_sync,
    probabilities_from_quantized,
    quantize_probabilities,
)

__all__ = [
    "FP16_MAX",
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "PayloadError",
    "ReplyPayload",
    "ScalarDtypeName",
    "SparseDelta",
    "SyncPayload",
    "decode_reply",
    "decode_sync",
    "encode_reply",
    "encode_sync",
    "probabilities_from_quantized",
    "quantize_probabilities",
]
