"""Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017): the server learns only the sum of the surviving clients' vectors.

A pure library: the state machines (:mod:`~fedtune.secagg.protocol`), their messages and wire codec, and
the primitives (X25519, HKDF, ChaCha20 masks, ChaCha20-Poly1305 shares, Shamir, fixed-point encoding).
The runtime carries the messages. Flower's own SecAgg+ is not used: it works only through the legacy
workflow API, and it seeds its masks with a 32-bit XOR fold of the shared key (flwr issue 7522).
"""

from fedtune.secagg.codec import Stage, decode_envelope, encode_envelope
from fedtune.secagg.errors import (
    SecAggAbort,
    SecAggError,
    SecAggPayloadError,
    SecAggStageError,
    ShareDecryptionError,
)
from fedtune.secagg.messages import (
    KeysBroadcast,
    KeysReply,
    MaskedInput,
    MaskRequest,
    NodeKeys,
    SetupRequest,
    SharesReply,
    UnmaskReply,
    UnmaskRequest,
)
from fedtune.secagg.protocol import SecAggClient, SecAggServer
from fedtune.secagg.quantize import Quantizer

__all__ = [
    "KeysBroadcast",
    "KeysReply",
    "MaskRequest",
    "MaskedInput",
    "NodeKeys",
    "Quantizer",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggPayloadError",
    "SecAggServer",
    "SecAggStageError",
    "SetupRequest",
    "ShareDecryptionError",
    "SharesReply",
    "Stage",
    "UnmaskReply",
    "UnmaskRequest",
    "decode_envelope",
    "encode_envelope",
]
