"""Typed split-and-privatize round payloads and their protobuf encoding (``proto/fedtune/v1/sap.proto``).

One :class:`SplitRoundPayload` per sampled client per round (where the split server is, the
stream's id and token, how many steps) and one :class:`SplitReplyPayload` back (what the round's
steps cost and, for a U-shaped classifier, the client's trained head). The per-step traffic is
not here: it travels on the split channel (``split.proto``). Everything decoded is untrusted and
checked; a defect raises :class:`PayloadError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final, TypeVar

from fedtune._proto.v1 import sap_pb2 as pb
from fedtune.wire._validate import UINT64_MAX, FloatArray, check_ascii_text, check_finite_float, check_uint
from fedtune.wire.codec import PayloadError, _parse
from fedtune.wire.dp_report import DPFigures
from fedtune.wire.lora_codec import arrays_equal, check_arrays, pack_arrays, unpack_arrays

SAP_SCHEMA_VERSION: Final = 1
_SUPPORTED: Final = frozenset({SAP_SCHEMA_VERSION})
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,255}:[0-9]{1,5}$")
_HEX = re.compile(r"^[0-9a-f]{16,128}$")
MAX_STEPS: Final = 100_000
MAX_CLASSES: Final = 10_000
MAX_CERT_BYTES: Final = 1 << 20
P = TypeVar("P", "SplitRoundPayload", "SplitReplyPayload")


def _heads(value: Mapping[str, FloatArray]) -> Mapping[str, FloatArray]:
    return MappingProxyType({}) if not value else check_arrays(value)


@dataclass(frozen=True, eq=False)
class SplitRoundPayload:
    """Server -> client: reach ``address`` with ``stream_id``/``token`` and run ``steps`` steps."""

    server_round: int
    address: str
    stream_id: str
    token: str
    steps: int
    batch_size: int
    class_names: tuple[str, ...] = ()
    root_certificates: bytes = b""
    head: Mapping[str, FloatArray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "server_round", check_uint("server_round", self.server_round))
        if not isinstance(self.address, str) or not _ADDRESS.match(self.address):
            raise ValueError(f"address {self.address!r} must be host:port")
        hint = "the server issues it"
        set_(
            self, "stream_id", check_ascii_text("stream_id", self.stream_id, 128, hint=hint, ascii_hint=hint)
        )
        if not isinstance(self.token, str) or not _HEX.match(self.token):
            raise ValueError("token must be 16-128 lowercase hex characters (the server issues it)")
        set_(self, "steps", check_uint("steps", self.steps, minimum=1, maximum=MAX_STEPS))
        set_(self, "batch_size", check_uint("batch_size", self.batch_size, minimum=1, maximum=4096))
        names = tuple(self.class_names)
        if len(names) > MAX_CLASSES or len(set(names)) != len(names) or len(names) == 1:
            raise ValueError("class_names must be empty or >= 2 distinct names")
        for n in names:
            check_ascii_text("class name", n, 256, hint="use short class labels", ascii_hint="ASCII labels")
        set_(self, "class_names", names)
        if not isinstance(self.root_certificates, bytes) or len(self.root_certificates) > MAX_CERT_BYTES:
            raise ValueError("root_certificates must be PEM bytes of at most 1 MiB")
        set_(self, "head", _heads(self.head))

    def __eq__(self, other: object) -> bool:
        return _equal(self, other) if isinstance(other, SplitRoundPayload) else NotImplemented

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class SplitReplyPayload:
    """Client -> server: the round's step count, mean loss, measured traffic, noise, and head;
    ``dp``: the label-DP figures of a private U-shaped run (:mod:`fedtune.sap.dp`), else None."""

    server_round: int
    steps_done: int
    num_examples: int
    train_loss: float
    bytes_up_per_step: float
    bytes_down_per_step: float
    step_ms: float
    noised_norm: float
    noise_norm: float
    peak_memory_mb: float
    head: Mapping[str, FloatArray] = field(default_factory=dict)
    dp: DPFigures | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.dp is not None and not isinstance(self.dp, DPFigures):
            raise ValueError(f"dp must be DPFigures or None, got {type(self.dp).__name__}")
        set_(self, "server_round", check_uint("server_round", self.server_round))
        set_(self, "steps_done", check_uint("steps_done", self.steps_done, maximum=MAX_STEPS))
        set_(
            self, "num_examples", check_uint("num_examples", self.num_examples, minimum=1, maximum=UINT64_MAX)
        )
        set_(self, "train_loss", check_finite_float("train_loss", self.train_loss, float32=True))
        for key in ("bytes_up_per_step", "bytes_down_per_step", "step_ms", "noised_norm", "noise_norm"):
            value = check_finite_float(key, getattr(self, key))
            if value < 0:
                raise ValueError(f"{key}={value} must be >= 0")
            set_(self, key, value)
        mem = check_finite_float("peak_memory_mb", self.peak_memory_mb, float32=True)
        if mem < 0 or math.isnan(mem):
            raise ValueError(f"peak_memory_mb={mem} must be >= 0")
        set_(self, "peak_memory_mb", mem)
        set_(self, "head", _heads(self.head))

    def __eq__(self, other: object) -> bool:
        return _equal(self, other) if isinstance(other, SplitReplyPayload) else NotImplemented

    __hash__ = None  # type: ignore[assignment]


Payload = SplitRoundPayload | SplitReplyPayload


_OWN_CODING = frozenset({"head", "dp"})  # encoded apart from the scalar fields


def _equal(a: Payload, b: Payload) -> bool:
    scalars = [f.name for f in fields(a) if f.name != "head"]
    return all(getattr(a, k) == getattr(b, k) for k in scalars) and arrays_equal(a.head, b.head)


# The payload dataclasses name their fields as the messages do, so one mapping serves both.
def _encode(p: Payload, message: type[pb.SplitRound] | type[pb.SplitReply]) -> bytes:
    values: dict[str, Any] = {f.name: getattr(p, f.name) for f in fields(p) if f.name not in _OWN_CODING}
    if "class_names" in values:
        values["class_names"] = list(values["class_names"])
    if isinstance(p, SplitReplyPayload) and p.dp is not None:
        values["dp"] = p.dp.to_pb()
    return message(schema_version=SAP_SCHEMA_VERSION, head=pack_arrays(p.head), **values).SerializeToString()


def _decode(b: bytes, message: pb.SplitRound | pb.SplitReply, payload: type[P]) -> P:
    msg = _parse(b, message, supported=_SUPPORTED)
    what = type(message).__name__
    names = {f.name for f in fields(payload)}
    values: dict[str, Any] = {n: getattr(msg, n) for n in names - _OWN_CODING}
    if "class_names" in values:
        values["class_names"] = tuple(values["class_names"])
    try:
        if isinstance(msg, pb.SplitReply):
            values["dp"] = DPFigures.from_pb(msg.dp) if msg.HasField("dp") else None
        return payload(**values, head=unpack_arrays(msg.head, what))
    except ValueError as exc:
        raise PayloadError(f"invalid {what}: {exc}") from exc


def encode_split_round(p: SplitRoundPayload) -> bytes:
    if not isinstance(p, SplitRoundPayload):
        raise TypeError(f"encode_split_round expects a SplitRoundPayload, got {type(p).__name__}")
    return _encode(p, pb.SplitRound)


def decode_split_round(b: bytes) -> SplitRoundPayload:
    return _decode(b, pb.SplitRound(), SplitRoundPayload)


def encode_split_reply(p: SplitReplyPayload) -> bytes:
    if not isinstance(p, SplitReplyPayload):
        raise TypeError(f"encode_split_reply expects a SplitReplyPayload, got {type(p).__name__}")
    return _encode(p, pb.SplitReply)


def decode_split_reply(b: bytes) -> SplitReplyPayload:
    return _decode(b, pb.SplitReply(), SplitReplyPayload)
