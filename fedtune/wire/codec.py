"""Typed FedKSeed payloads and their exact-size protobuf encoding (``proto/fedtune/v1/fedkseed.proto``).

FedKSeed (Qin et al., ICML 2024, arXiv:2312.06353) exchanges only seed indices and scalars, so a
round costs under 18 KB per client: the server syncs the K cumulative per-seed coefficients and each
client answers with its tau ``(seed_index, projected_grad)`` pairs. Arrays are packed little-endian
into ``bytes`` fields, which keeps the size exact and lets decoding check every length. The bytes
travel inside a Flower ``ConfigRecord``; this module never imports Flower.

Everything decoded is untrusted: any malformed, inconsistent or non-finite input raises
:class:`PayloadError` naming the problem, never a half-valid payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from fedtune._proto.v1 import fedkseed_pb2 as pb
from fedtune.wire._validate import (
    UINT32_MAX,
    UINT64_MAX,
    ArrayEq,
    FloatArray,
    check_fingerprint,
    check_finite_float,
    check_float_array,
    check_index_array,
    check_uint,
    readonly,
)
from fedtune.wire.dp_report import DPFigures

IndexArray = npt.NDArray[np.int64]
U32Array = npt.NDArray[np.uint32]
U8Array = npt.NDArray[np.uint8]
ScalarDtypeName = Literal["float32", "float16"]

SCHEMA_VERSION: Final = 1
SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({SCHEMA_VERSION})
FP16_MAX: Final = 65504.0
UINT16_MAX_SEEDS: Final = 65536  # K up to this packs indices as uint16

_WIDTH_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    pb.INDEX_WIDTH_UINT16: np.dtype("<u2"),
    pb.INDEX_WIDTH_UINT32: np.dtype("<u4"),
}
_SCALAR_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    pb.SCALAR_DTYPE_FLOAT32: np.dtype("<f4"),
    pb.SCALAR_DTYPE_FLOAT16: np.dtype("<f2"),
}
_SCALAR_ENUMS: Final = {"float32": pb.SCALAR_DTYPE_FLOAT32, "float16": pb.SCALAR_DTYPE_FLOAT16}


class _Versioned(Protocol):
    """Any fedtune message: every schema carries ``schema_version`` as field 1."""

    schema_version: int

    def ParseFromString(self, serialized: bytes, /) -> int: ...  # noqa: N802 (protobuf's name)


_M = TypeVar("_M", bound=_Versioned)


class PayloadError(ValueError):
    """A payload cannot be encoded, or received bytes are not a valid payload of this schema."""


# ----------------------------------------------------------------------------- payload dataclasses
@dataclass(frozen=True, eq=False, kw_only=True)
class SparseDelta(ArrayEq):
    """Accumulator change since ``base_round``: ``A = A_base; A[indices] += values``.

    ``base_round = 0`` is relative to zero, i.e. the whole accumulator in sparse form.

    ``indices`` are strictly increasing (``np.unique`` order) and stored as uint32; ``values`` float32.
    The range check against K happens in :class:`SyncPayload`.
    """

    base_round: int
    indices: U32Array
    values: FloatArray

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_round", check_uint("base_round", self.base_round))
        idx = check_index_array("SparseDelta.indices", self.indices, UINT32_MAX + 1, np.uint32)
        if idx.size > 1 and not np.all(np.diff(idx.astype(np.int64)) > 0):
            raise ValueError("SparseDelta.indices must be strictly increasing; pass np.unique(indices) order")
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "values", check_float_array("SparseDelta.values", self.values, idx.shape[0]))


@dataclass(frozen=True, eq=False, kw_only=True)
class SyncPayload(ArrayEq):
    """Server -> client round start (message ``KSeedSync``).

    server_round: Flower round number. lr, eps: step size and SPSA perturbation scale (> 0, sent as
    doubles so both sides rebuild theta with the same values). num_local_steps: tau. batch_size: local
    minibatch size. num_seeds: K. fingerprint: digest of the model/perturbation the server expects.
    accumulator: dense float32[K] cumulative per-seed coefficients A, or a :class:`SparseDelta`
    against an earlier round. quantized_probabilities: FedKSeed-Pro uint8[K] scores from
    :func:`quantize_probabilities`, or None for uniform seed sampling.
    """

    server_round: int
    lr: float
    eps: float
    num_local_steps: int
    batch_size: int
    num_seeds: int
    fingerprint: str
    accumulator: FloatArray | SparseDelta
    quantized_probabilities: U8Array | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "server_round", check_uint("server_round", self.server_round))
        set_(self, "lr", check_finite_float("lr", self.lr, positive=True))
        set_(self, "eps", check_finite_float("eps", self.eps, positive=True))
        set_(self, "num_local_steps", check_uint("num_local_steps", self.num_local_steps, minimum=1))
        set_(self, "batch_size", check_uint("batch_size", self.batch_size, minimum=1))
        k = check_uint("num_seeds", self.num_seeds, minimum=1)
        set_(self, "num_seeds", k)
        set_(self, "fingerprint", check_fingerprint(self.fingerprint))
        acc = self.accumulator
        if isinstance(acc, SparseDelta):
            if acc.base_round >= self.server_round:
                raise ValueError(
                    f"SparseDelta.base_round={acc.base_round} must be < server_round={self.server_round}; "
                    "a delta is relative to an earlier round"
                )
            if acc.indices.size and int(acc.indices[-1]) >= k:
                raise ValueError(f"SparseDelta.indices reach {acc.indices[-1]} but num_seeds={k}")
        else:
            set_(self, "accumulator", check_float_array("accumulator", acc, k))
        if self.quantized_probabilities is not None:
            q = np.asarray(self.quantized_probabilities)
            if q.dtype != np.uint8 or q.shape != (k,):
                raise ValueError(
                    f"quantized_probabilities must be uint8[num_seeds={k}], got {q.dtype}{list(q.shape)}; "
                    "build it with quantize_probabilities(scores), or pass None for uniform sampling"
                )
            q = q.copy()
            readonly(q)
            set_(self, "quantized_probabilities", q)

    def sampling_probabilities(self) -> npt.NDArray[np.float64]:
        """Seed-sampling distribution for this round: uniform, or FedKSeed-Pro's softmax(q/255)."""
        if self.quantized_probabilities is None:
            return np.full(self.num_seeds, 1.0 / self.num_seeds)
        return probabilities_from_quantized(self.quantized_probabilities)


@dataclass(frozen=True, eq=False, kw_only=True)
class ReplyPayload(ArrayEq):
    """Client -> server after local steps (message ``KSeedReply``).

    num_seeds: K, the pool the indices address (context for validation, not sent). seed_indices:
    int64 index of each step taken; projected_grads: its float32 scalar g. train_loss and
    peak_memory_mb travel as float32 and are stored rounded to float32 so a round trip is exact.
    num_skipped_steps counts steps dropped for NaN losses (absent from the arrays). dp: the
    DP figures of a private run (None otherwise).
    """

    server_round: int
    num_seeds: int
    num_examples: int
    seed_indices: IndexArray
    projected_grads: FloatArray
    train_loss: float
    num_skipped_steps: int
    peak_memory_mb: float
    fingerprint: str
    dp: DPFigures | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "server_round", check_uint("server_round", self.server_round))
        k = check_uint("num_seeds", self.num_seeds, minimum=1)
        set_(self, "num_seeds", k)
        set_(self, "num_examples", check_uint("num_examples", self.num_examples, maximum=UINT64_MAX))
        idx = check_index_array("seed_indices", self.seed_indices, k, np.int64)
        set_(self, "seed_indices", idx)
        grads = np.asarray(self.projected_grads)
        if grads.ndim == 1 and grads.shape[0] != idx.shape[0]:
            raise ValueError(
                f"seed_indices has {idx.shape[0]} entries but projected_grads has {grads.shape[0]}; "
                "send exactly one projected_grad per seed_index"
            )
        set_(self, "projected_grads", check_float_array("projected_grads", grads))
        set_(self, "train_loss", check_finite_float("train_loss", self.train_loss, float32=True))
        set_(self, "num_skipped_steps", check_uint("num_skipped_steps", self.num_skipped_steps))
        mem = check_finite_float("peak_memory_mb", self.peak_memory_mb, float32=True)
        if mem < 0.0:
            raise ValueError(f"peak_memory_mb={mem} must be >= 0")
        set_(self, "peak_memory_mb", mem)
        set_(self, "fingerprint", check_fingerprint(self.fingerprint))
        if self.dp is not None and not isinstance(self.dp, DPFigures):
            raise ValueError(f"dp must be DPFigures or None, got {type(self.dp).__name__}")


# ----------------------------------------------------------------------------- FedKSeed-Pro helpers
def quantize_probabilities(scores: npt.ArrayLike) -> U8Array:
    """FedKSeed-Pro seed scores a_s -> uint8 q_s = round(255 * (a - min a) / (max a - min a + 1e-10)).

    Quantizing before the softmax lets server and client derive the sampling distribution from the same
    K bytes (the min-max normalization is the paper's). Equal scores give all zeros, i.e. uniform.
    """
    a = np.asarray(scores)
    if a.ndim != 1 or a.size == 0 or a.dtype.kind not in "iuf":
        raise ValueError(
            f"scores must be a non-empty 1-D real array, got {a.ndim}-D {a.dtype} of size {a.size}"
        )
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("scores hold NaN or Inf; clip the per-seed gradient history before scoring")
    lo, hi = float(a.min()), float(a.max())
    normalized = (a - lo) / (hi - lo + 1e-10)
    return np.clip(np.rint(255.0 * normalized), 0, 255).astype(np.uint8)


def probabilities_from_quantized(q: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """p = softmax(q / 255) in float64, summing to 1; the distribution FedKSeed-Pro clients sample from."""
    arr = np.asarray(q)
    if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"q must be a non-empty 1-D uint8 array, got {arr.ndim}-D {arr.dtype}; use quantize_probabilities"
        )
    x = arr.astype(np.float64) / 255.0
    w = np.exp(x - x.max())
    p: npt.NDArray[np.float64] = w / w.sum()
    return p


# ----------------------------------------------------------------------------- packing
def _index_width(num_seeds: int) -> pb.IndexWidth:
    return pb.INDEX_WIDTH_UINT16 if num_seeds <= UINT16_MAX_SEEDS else pb.INDEX_WIDTH_UINT32


def _pack_indices(indices: npt.NDArray[np.integer], width: pb.IndexWidth) -> bytes:
    return indices.astype(_WIDTH_DTYPES[width]).tobytes()


def _unpack(data: bytes, dtype: np.dtype[Any], what: str) -> npt.NDArray[Any]:
    if len(data) % dtype.itemsize:
        raise PayloadError(
            f"{what} holds {len(data)} bytes, not a multiple of {dtype.itemsize} ({dtype.name}); "
            "the payload is truncated or was packed with another element type"
        )
    return np.frombuffer(data, dtype=dtype)


def _unpack_indices(data: bytes, width: int, what: str) -> npt.NDArray[Any]:
    if width not in _WIDTH_DTYPES:
        raise PayloadError(f"{what}: unknown index_width {width}; the sender must set UINT16 or UINT32")
    return _unpack(data, _WIDTH_DTYPES[width], what)


def _parse(data: object, message: _M, *, supported: frozenset[int] = SUPPORTED_SCHEMA_VERSIONS) -> _M:
    """Parse untrusted ``data`` into ``message``, refusing non-bytes, corrupt bytes and unknown versions.

    Shared by every wire module; ``supported`` is the set of schema versions of that module's messages.
    """
    name = type(message).__name__
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode expects bytes for {name}, got {type(data).__name__}")
    try:
        message.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise PayloadError(
            f"malformed {name} protobuf ({exc}); the bytes are corrupt or not a {name}"
        ) from exc
    if message.schema_version not in supported:
        raise PayloadError(
            f"{name} schema_version {message.schema_version} is not supported (this fedtune reads "
            f"{sorted(supported)}); the bytes are empty/not a {name}, or the sender runs "
            "another fedtune version: upgrade the older side"
        )
    return message


# ----------------------------------------------------------------------------- sync
def encode_sync(p: SyncPayload) -> bytes:
    """Serialize a :class:`SyncPayload` to ``KSeedSync`` bytes (dense: 4K bytes plus ~100 B)."""
    if not isinstance(p, SyncPayload):
        raise TypeError(f"encode_sync expects a SyncPayload, got {type(p).__name__}")
    msg = pb.KSeedSync(
        schema_version=SCHEMA_VERSION,
        server_round=p.server_round,
        lr=p.lr,
        eps=p.eps,
        num_local_steps=p.num_local_steps,
        batch_size=p.batch_size,
        num_seeds=p.num_seeds,
        fingerprint=p.fingerprint,
    )
    acc = p.accumulator
    if isinstance(acc, SparseDelta):
        width = _index_width(p.num_seeds)
        msg.sparse_delta.base_round = acc.base_round
        msg.sparse_delta.index_width = width
        msg.sparse_delta.indices = _pack_indices(acc.indices, width)
        msg.sparse_delta.values = acc.values.astype("<f4").tobytes()
    else:
        msg.dense.values = acc.astype("<f4").tobytes()
    if p.quantized_probabilities is not None:
        msg.quantized_probabilities = p.quantized_probabilities.tobytes()
    return msg.SerializeToString()


def decode_sync(b: bytes) -> SyncPayload:
    """Parse and validate untrusted ``KSeedSync`` bytes; raises :class:`PayloadError` on any defect."""
    msg = _parse(b, pb.KSeedSync())
    kind = msg.WhichOneof("accumulator")
    accumulator: FloatArray | SparseDelta
    try:
        if kind == "dense":
            accumulator = _unpack(msg.dense.values, np.dtype("<f4"), "dense accumulator").astype(np.float32)
        elif kind == "sparse_delta":
            d = msg.sparse_delta
            accumulator = SparseDelta(
                base_round=d.base_round,
                indices=_unpack_indices(d.indices, d.index_width, "sparse_delta.indices").astype(np.uint32),
                values=_unpack(d.values, np.dtype("<f4"), "sparse_delta.values").astype(np.float32),
            )
        else:
            raise PayloadError("KSeedSync has no accumulator; the sender must set dense or sparse_delta")
        q = msg.quantized_probabilities
        return SyncPayload(
            server_round=msg.server_round,
            lr=msg.lr,
            eps=msg.eps,
            num_local_steps=msg.num_local_steps,
            batch_size=msg.batch_size,
            num_seeds=msg.num_seeds,
            fingerprint=msg.fingerprint,
            accumulator=accumulator,
            quantized_probabilities=np.frombuffer(q, dtype=np.uint8).copy() if q else None,
        )
    except PayloadError:
        raise
    except ValueError as exc:
        raise PayloadError(f"invalid KSeedSync: {exc}") from exc


# ----------------------------------------------------------------------------- reply
def encode_reply(p: ReplyPayload, *, scalar_dtype: ScalarDtypeName = "float32") -> bytes:
    """Serialize a :class:`ReplyPayload` to ``KSeedReply`` bytes.

    ``scalar_dtype="float16"`` halves the gradient bytes; it refuses (never clips) any |g| > 65504,
    since silently changing a gradient would corrupt the replayed model. Tiny |g| may round to zero.
    """
    if not isinstance(p, ReplyPayload):
        raise TypeError(f"encode_reply expects a ReplyPayload, got {type(p).__name__}")
    if scalar_dtype not in _SCALAR_ENUMS:
        raise ValueError(f"scalar_dtype must be 'float32' or 'float16', got {scalar_dtype!r}")
    grads = p.projected_grads
    if scalar_dtype == "float16" and grads.size and float(np.abs(grads).max()) > FP16_MAX:
        i = int(np.argmax(np.abs(grads)))
        raise PayloadError(
            f"projected_grads[{i}]={float(grads[i])!r} overflows float16 (|g| <= {FP16_MAX}); "
            "encode with scalar_dtype='float32', or clip g on the client before building the payload"
        )
    width = _index_width(p.num_seeds)
    enum = _SCALAR_ENUMS[scalar_dtype]
    return pb.KSeedReply(
        schema_version=SCHEMA_VERSION,
        server_round=p.server_round,
        num_examples=p.num_examples,
        index_width=width,
        seed_indices=_pack_indices(p.seed_indices, width),
        scalar_dtype=enum,
        projected_grads=grads.astype(_SCALAR_DTYPES[enum]).tobytes(),
        train_loss=p.train_loss,
        num_skipped_steps=p.num_skipped_steps,
        peak_memory_mb=p.peak_memory_mb,
        fingerprint=p.fingerprint,
        dp=p.dp.to_pb() if p.dp is not None else None,
    ).SerializeToString()


def decode_reply(b: bytes, *, num_seeds: int) -> ReplyPayload:
    """Parse and validate untrusted ``KSeedReply`` bytes against a pool of ``num_seeds`` seeds.

    Gradients are returned as float32 whatever the wire dtype. Raises :class:`PayloadError`.
    """
    k = check_uint("num_seeds", num_seeds, minimum=1)
    msg = _parse(b, pb.KSeedReply())
    if msg.scalar_dtype not in _SCALAR_DTYPES:
        raise PayloadError(
            f"KSeedReply: unknown scalar_dtype {msg.scalar_dtype}; the sender must set FLOAT32 or FLOAT16"
        )
    try:
        indices = _unpack_indices(msg.seed_indices, msg.index_width, "seed_indices")
        grads = _unpack(msg.projected_grads, _SCALAR_DTYPES[msg.scalar_dtype], "projected_grads")
        if indices.shape != grads.shape:
            raise PayloadError(
                f"KSeedReply carries {indices.shape[0]} seed_indices but {grads.shape[0]} projected_grads; "
                "the sender must pack one projected_grad per seed_index"
            )
        return ReplyPayload(
            server_round=msg.server_round,
            num_seeds=k,
            num_examples=msg.num_examples,
            seed_indices=indices.astype(np.int64),
            projected_grads=grads.astype(np.float32),
            train_loss=msg.train_loss,
            num_skipped_steps=msg.num_skipped_steps,
            peak_memory_mb=msg.peak_memory_mb,
            fingerprint=msg.fingerprint,
            dp=DPFigures.from_pb(msg.dp) if msg.HasField("dp") else None,
        )
    except PayloadError:
        raise
    except ValueError as exc:
        raise PayloadError(f"invalid KSeedReply: {exc}") from exc
