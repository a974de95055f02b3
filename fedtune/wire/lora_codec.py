"""Typed federated-LoRA payloads and their exact-size protobuf encoding (``proto/fedtune/v1/lora.proto``).

Federated LoRA sends only the adapter matrices: the server syncs the global adapter, each client
answers with its locally trained one and the FedAvg weight (``num_examples``). Every array is a named
float32 tensor packed little-endian in C order into a ``bytes`` field, so an adapter of N elements costs
4N bytes plus a small header and decoding can check each length against the declared shape. The bytes
travel inside a Flower ``ConfigRecord``; this module never imports Flower.

Array order is kept end to end (the mapping's insertion order), so equal payloads encode to equal bytes.
Everything decoded is untrusted: any malformed, inconsistent or non-finite input raises
:class:`PayloadError` naming the problem, never a half-valid payload.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import numpy as np

from fedtune._proto.v1 import lora_pb2 as pb
from fedtune.wire._validate import (
    UINT64_MAX,
    FloatArray,
    check_ascii_text,
    check_finite_float,
    check_uint,
    readonly,
)
from fedtune.wire.codec import PayloadError, _parse
from fedtune.wire.dp_report import DPFigures

ArrayMap = Mapping[str, FloatArray]

LORA_SCHEMA_VERSION: Final = 1
LORA_SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({LORA_SCHEMA_VERSION})
MAX_ARRAY_NAME_CHARS: Final = 256
MAX_ARRAY_DIMS: Final = 8
_WIRE_DTYPE: Final = np.dtype("<f4")


# ----------------------------------------------------------------------------- validation
def _check_name(name: object) -> str:
    hint = "use the adapter's state_dict key"
    return check_ascii_text("array name", name, MAX_ARRAY_NAME_CHARS, hint=hint, ascii_hint=hint)


def _check_array(name: str, value: object) -> FloatArray:
    arr = np.asarray(value)
    if arr.dtype.kind != "f" or arr.dtype.itemsize != 4:
        raise ValueError(
            f"array {name!r} must be float32, got {arr.dtype}; convert with tensor.float() or "
            "np.asarray(..., dtype=np.float32)"
        )
    if not 1 <= arr.ndim <= MAX_ARRAY_DIMS:
        raise ValueError(
            f"array {name!r} has {arr.ndim} dimensions, expected 1..{MAX_ARRAY_DIMS}; "
            "reshape scalars to shape (1,)"
        )
    if 0 in arr.shape:
        raise ValueError(
            f"array {name!r} has shape {list(arr.shape)} with a zero dimension; an empty adapter tensor "
            "means a misconfigured LoRA rank or target module"
        )
    if not np.all(np.isfinite(arr)):
        bad = np.unravel_index(int(np.flatnonzero(~np.isfinite(arr))[0]), arr.shape)
        raise ValueError(
            f"array {name!r} holds NaN or Inf (first at index {tuple(int(i) for i in bad)}); "
            "training diverged: lower the learning rate or skip this reply"
        )
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    readonly(out)
    return out


def check_arrays(value: object) -> ArrayMap:
    if not isinstance(value, Mapping):
        raise ValueError(
            f"arrays must be a mapping of name -> float32 array, got {type(value).__name__}; "
            "pass the adapter state_dict as a dict of numpy arrays"
        )
    if not value:
        raise ValueError("arrays is empty; an adapter payload needs at least one named array")
    out: dict[str, FloatArray] = {}
    for name, arr in value.items():
        key = _check_name(name)
        out[key] = _check_array(key, arr)
    return MappingProxyType(out)


def arrays_equal(a: ArrayMap, b: ArrayMap) -> bool:
    """True when both mappings hold the same names in the same order, with equal shapes, dtypes, values.

    Order counts because it is part of the encoding: equal payloads must give equal bytes.
    """
    if list(a) != list(b):
        return False
    return all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


# ----------------------------------------------------------------------------- payload dataclasses
@dataclass(frozen=True, eq=False)
class AdapterSyncPayload:
    """Server -> client round start (message ``AdapterSync``): the global LoRA adapter.

    arrays: name -> float32 array (1..8 dims, no zero dimension, finite), copied, read-only, in an
    immutable mapping that keeps the given order.
    """

    server_round: int
    arrays: ArrayMap

    def __post_init__(self) -> None:
        object.__setattr__(self, "server_round", check_uint("server_round", self.server_round))
        object.__setattr__(self, "arrays", check_arrays(self.arrays))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, AdapterSyncPayload)
        return self.server_round == other.server_round and arrays_equal(self.arrays, other.arrays)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class AdapterReplyPayload:
    """Client -> server after local training (message ``AdapterReply``).

    num_examples (>= 1) is the FedAvg weight. train_loss and peak_memory_mb (>= 0) travel as float32
    and are stored rounded to float32 so a round trip is exact. arrays: as in :class:`AdapterSyncPayload`.
    dp: the DP figures of a private run (``privacy.mechanism``), None otherwise.
    """

    server_round: int
    num_examples: int
    train_loss: float
    peak_memory_mb: float
    arrays: ArrayMap
    dp: DPFigures | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "server_round", check_uint("server_round", self.server_round))
        n = check_uint("num_examples", self.num_examples, minimum=1, maximum=UINT64_MAX)
        set_(self, "num_examples", n)
        set_(self, "train_loss", check_finite_float("train_loss", self.train_loss, float32=True))
        mem = check_finite_float("peak_memory_mb", self.peak_memory_mb, float32=True)
        if mem < 0.0:
            raise ValueError(f"peak_memory_mb={mem} must be >= 0")
        set_(self, "peak_memory_mb", mem)
        set_(self, "arrays", check_arrays(self.arrays))
        if self.dp is not None and not isinstance(self.dp, DPFigures):
            raise ValueError(f"dp must be DPFigures or None, got {type(self.dp).__name__}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, AdapterReplyPayload)
        return (
            self.server_round == other.server_round
            and self.num_examples == other.num_examples
            and self.train_loss == other.train_loss
            and self.peak_memory_mb == other.peak_memory_mb
            and self.dp == other.dp
            and arrays_equal(self.arrays, other.arrays)
        )

    __hash__ = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------- packing
def pack_arrays(arrays: ArrayMap) -> list[pb.NamedArray]:
    return [
        pb.NamedArray(name=name, shape=arr.shape, data=arr.astype(_WIRE_DTYPE, copy=False).tobytes())
        for name, arr in arrays.items()
    ]


def unpack_arrays(items: Iterable[pb.NamedArray], what: str) -> dict[str, FloatArray]:
    """Check names, shapes and lengths before touching the data, so a lying shape allocates nothing."""
    out: dict[str, FloatArray] = {}
    for i, item in enumerate(items):
        try:
            name = _check_name(item.name)
        except ValueError as exc:
            raise PayloadError(f"{what}.arrays[{i}]: {exc}") from exc
        if name in out:
            raise PayloadError(
                f"{what}.arrays[{i}] repeats the name {name!r}; each adapter tensor must be sent once"
            )
        shape = tuple(item.shape)
        if not 1 <= len(shape) <= MAX_ARRAY_DIMS:
            raise PayloadError(
                f"{what} array {name!r} declares {len(shape)} dimensions, expected 1..{MAX_ARRAY_DIMS}; "
                "the sender must set the shape of every array"
            )
        data = item.data
        if len(data) % _WIRE_DTYPE.itemsize:
            raise PayloadError(
                f"{what} array {name!r} holds {len(data)} bytes, not a multiple of 4 (float32); "
                "the payload is truncated or was packed with another element type"
            )
        count = len(data) // _WIRE_DTYPE.itemsize
        if math.prod(shape) != count:
            raise PayloadError(
                f"{what} array {name!r} declares shape {list(shape)} ({math.prod(shape)} elements) but "
                f"carries {count} float32 elements; the payload is truncated or its shape is wrong"
            )
        # frombuffer shares the message's bytes; the payload constructor makes the owned copy.
        out[name] = np.frombuffer(data, dtype=_WIRE_DTYPE).reshape(shape)
    return out


# ----------------------------------------------------------------------------- sync
def encode_adapter_sync(p: AdapterSyncPayload) -> bytes:
    """Serialize an :class:`AdapterSyncPayload` to ``AdapterSync`` bytes (4 B per element plus headers)."""
    if not isinstance(p, AdapterSyncPayload):
        raise TypeError(f"encode_adapter_sync expects an AdapterSyncPayload, got {type(p).__name__}")
    return pb.AdapterSync(
        schema_version=LORA_SCHEMA_VERSION, server_round=p.server_round, arrays=pack_arrays(p.arrays)
    ).SerializeToString()


def decode_adapter_sync(b: bytes) -> AdapterSyncPayload:
    """Parse and validate untrusted ``AdapterSync`` bytes; raises :class:`PayloadError` on any defect."""
    msg = _parse(b, pb.AdapterSync(), supported=LORA_SUPPORTED_SCHEMA_VERSIONS)
    arrays = unpack_arrays(msg.arrays, "AdapterSync")
    try:
        return AdapterSyncPayload(server_round=msg.server_round, arrays=arrays)
    except ValueError as exc:
        raise PayloadError(f"invalid AdapterSync: {exc}") from exc


# ----------------------------------------------------------------------------- reply
def encode_adapter_reply(p: AdapterReplyPayload) -> bytes:
    """Serialize an :class:`AdapterReplyPayload` to ``AdapterReply`` bytes."""
    if not isinstance(p, AdapterReplyPayload):
        raise TypeError(f"encode_adapter_reply expects an AdapterReplyPayload, got {type(p).__name__}")
    return pb.AdapterReply(
        schema_version=LORA_SCHEMA_VERSION,
        server_round=p.server_round,
        num_examples=p.num_examples,
        train_loss=p.train_loss,
        peak_memory_mb=p.peak_memory_mb,
        arrays=pack_arrays(p.arrays),
        dp=p.dp.to_pb() if p.dp is not None else None,
    ).SerializeToString()


def decode_adapter_reply(b: bytes) -> AdapterReplyPayload:
    """Parse and validate untrusted ``AdapterReply`` bytes; raises :class:`PayloadError` on any defect."""
    msg = _parse(b, pb.AdapterReply(), supported=LORA_SUPPORTED_SCHEMA_VERSIONS)
    arrays = unpack_arrays(msg.arrays, "AdapterReply")
    try:
        return AdapterReplyPayload(
            server_round=msg.server_round,
            num_examples=msg.num_examples,
            train_loss=msg.train_loss,
            peak_memory_mb=msg.peak_memory_mb,
            arrays=arrays,
            dp=DPFigures.from_pb(msg.dp) if msg.HasField("dp") else None,
        )
    except ValueError as exc:
        raise PayloadError(f"invalid AdapterReply: {exc}") from exc
