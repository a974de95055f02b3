"""The messages of one secure-aggregation round, as validated frozen dataclasses.

Each checks its own structure on construction (types, ranges, lengths, unique node ids) and raises
ValueError saying what is wrong; the codec turns that into :class:`SecAggPayloadError` for received
bytes. Whether a message fits the round (right nodes, right stage) is the protocol's check, not theirs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np

from fedtune.secagg.crypto import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from fedtune.secagg.quantize import Quantizer, U64Array
from fedtune.secagg.shamir import SHARE_BYTES, check_share_value

NODE_ID_MAX: Final = 2**64 - 1
MAX_RUN_KEY_CHARS: Final = 256
MAX_VECTOR_LENGTH: Final = 2**31 - 1
# A ciphertext seals one b-share and one s-share: nonce + 2 field elements + tag.
CIPHERTEXT_BYTES: Final = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES


def _int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{name}={value} is outside [{lo}, {hi}]")
    return int(value)


def _node(name: str, value: object) -> int:
    return _int(name, value, 0, NODE_ID_MAX)


def _nodes(name: str, values: Iterable[object], *, sort: bool = True) -> tuple[int, ...]:
    nodes = [_node(f"{name} entry", v) for v in values]
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"{name} lists a node twice: {nodes}; each node may appear once")
    return tuple(sorted(nodes)) if sort else tuple(nodes)


def _key(name: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        size = len(value) if isinstance(value, bytes) else type(value).__name__
        raise ValueError(f"{name} must be {KEY_BYTES} raw bytes (an X25519 public key), got {size}")
    return value


def _addressed(name: str, items: Iterable[tuple[int, bytes]]) -> tuple[tuple[int, bytes], ...]:
    out = []
    for item in items:
        node, ct = item
        node = _node(f"{name} node id", node)
        if not isinstance(ct, bytes) or len(ct) != CIPHERTEXT_BYTES:
            size = len(ct) if isinstance(ct, bytes) else type(ct).__name__
            raise ValueError(
                f"{name}: the ciphertext for node {node} must be {CIPHERTEXT_BYTES} bytes, got {size}"
            )
        out.append((node, ct))
    _nodes(name, (n for n, _ in out), sort=False)
    return tuple(sorted(out))


def _shares(name: str, items: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out = []
    for node, y in items:
        try:
            out.append((_node(f"{name} node id", node), check_share_value(y)))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
    _nodes(name, (n for n, _ in out), sort=False)
    return tuple(sorted(out))


@dataclass(frozen=True)
class SetupRequest:
    """Server -> client, stage 1: the round's parameters. ``participants`` is kept sorted."""

    run_key: str
    server_round: int
    participants: tuple[int, ...]
    threshold: int
    vector_length: int
    fraction_bits: int
    clip: float

    def __post_init__(self) -> None:
        key = self.run_key
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_RUN_KEY_CHARS or not key.isprintable():
            raise ValueError(f"run_key must be 1..{MAX_RUN_KEY_CHARS} printable characters, got {key!r:.60}")
        _int("server_round", self.server_round, 0, NODE_ID_MAX)
        participants = _nodes("participants", self.participants)
        object.__setattr__(self, "participants", participants)
        n = len(participants)
        if n < 2:
            raise ValueError(
                f"secure aggregation needs at least 2 participants, got {n}; sample more clients"
            )
        _int("threshold", self.threshold, 2, n)
        _int("vector_length", self.vector_length, 1, MAX_VECTOR_LENGTH)
        if (
            isinstance(self.clip, bool)
            or not isinstance(self.clip, int | float)
            or not math.isfinite(self.clip)
        ):
            raise ValueError(f"clip must be a finite number, got {self.clip!r}")
        object.__setattr__(self, "clip", float(self.clip))
        self.quantizer()  # the overflow check for this many participants

    def quantizer(self) -> Quantizer:
        return Quantizer(self.fraction_bits, self.clip, len(self.participants))

    def x_of(self, node: int) -> int:
        """The Shamir evaluation point of ``node``: its index in the sorted participants + 1."""
        return self.participants.index(node) + 1


@dataclass(frozen=True)
class KeysReply:
    """Client -> server, stage 1: the client's fresh public keys (c for shares, s for masks)."""

    node_id: int
    c_public: bytes
    s_public: bytes

    def __post_init__(self) -> None:
        _node("node_id", self.node_id)
        _key("c_public", self.c_public)
        _key("s_public", self.s_public)


@dataclass(frozen=True)
class NodeKeys(KeysReply):
    """One entry of :class:`KeysBroadcast`: a participant's keys as it sent them (a distinct type, so
    a stage-1 reply cannot pass for a broadcast entry)."""


@dataclass(frozen=True)
class KeysBroadcast:
    """Server -> each client in U1, stage 2: everyone's public keys, sorted by node id."""

    keys: tuple[NodeKeys, ...]

    def __post_init__(self) -> None:
        if not all(isinstance(k, NodeKeys) for k in self.keys):
            raise ValueError("keys must be NodeKeys entries")
        _nodes("keys", (k.node_id for k in self.keys))
        object.__setattr__(self, "keys", tuple(sorted(self.keys, key=lambda k: k.node_id)))

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(k.node_id for k in self.keys)


@dataclass(frozen=True)
class SharesReply:
    """Client -> server, stage 2: ``(to, ciphertext)`` of the client's shares for each other node."""

    node_id: int
    ciphertexts: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        _node("node_id", self.node_id)
        object.__setattr__(self, "ciphertexts", _addressed("ciphertexts", self.ciphertexts))


@dataclass(frozen=True)
class MaskRequest:
    """Server -> each client in U2, stage 3: U2 and the ``(from, ciphertext)`` addressed to the client."""

    participants_u2: tuple[int, ...]
    ciphertexts: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "participants_u2", _nodes("participants_u2", self.participants_u2))
        object.__setattr__(self, "ciphertexts", _addressed("ciphertexts", self.ciphertexts))


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Client -> server, stage 3: the masked uint64 vector (read-only copy) and its clip count."""

    node_id: int
    masked: U64Array
    clipped: int

    def __post_init__(self) -> None:
        _node("node_id", self.node_id)
        arr = np.asarray(self.masked)
        if arr.dtype != np.uint64 or arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"masked must be a non-empty 1-D uint64 array, got {arr.ndim}-D {arr.dtype}")
        arr = arr.copy()
        arr.flags.writeable = False
        object.__setattr__(self, "masked", arr)
        _int("clipped", self.clipped, 0, arr.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskedInput):
            return NotImplemented
        return (self.node_id, self.clipped) == (other.node_id, other.clipped) and bool(
            np.array_equal(self.masked, other.masked)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> each client in U3, stage 4: who sent masked input (U3) and who dropped (U2 \\ U3)."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "survivors", _nodes("survivors", self.survivors))
        object.__setattr__(self, "dropped", _nodes("dropped", self.dropped))


@dataclass(frozen=True)
class UnmaskReply:
    """Client -> server, stage 4: its b-share of each survivor and s-share of each dropped node."""

    node_id: int
    b_shares: tuple[tuple[int, int], ...]
    s_shares: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        _node("node_id", self.node_id)
        object.__setattr__(self, "b_shares", _shares("b_shares", self.b_shares))
        object.__setattr__(self, "s_shares", _shares("s_shares", self.s_shares))


Request = SetupRequest | KeysBroadcast | MaskRequest | UnmaskRequest
Reply = KeysReply | SharesReply | MaskedInput | UnmaskReply
Message = Request | Reply
