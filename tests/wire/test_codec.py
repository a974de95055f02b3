"""FedKSeed wire codec: exact round trips, untrusted-input rejection and the 18 KB budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fedtune._proto.v1 import fedkseed_pb2 as pb
from fedtune.wire import (
    FP16_MAX,
    PayloadError,
    ReplyPayload,
    SparseDelta,
    SyncPayload,
    decode_reply,
    decode_sync,
    encode_reply,
    encode_sync,
    probabilities_from_quantized,
    quantize_probabilities,
)

K, TAU = 4096, 200
BIG_K = 100_000
FP = "3f" * 32  # a 64-character hex digest


def _rng(tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([20240601, tag]))


def _sync(
    *, num_seeds: int = K, accumulator: npt.NDArray[np.float32] | SparseDelta | None = None, **kw: object
) -> SyncPayload:
    acc = _rng(1).standard_normal(num_seeds).astype(np.float32) if accumulator is None else accumulator
    args: dict[str, object] = dict(
        server_round=7,
        lr=3e-7,
        eps=5e-4,
        num_local_steps=TAU,
        batch_size=1,
        num_seeds=num_seeds,
        fingerprint=FP,
        accumulator=acc,
    )
    args.update(kw)
    return SyncPayload(**args)  # type: ignore[arg-type]


def _reply(*, num_seeds: int = K, steps: int = TAU, scale: float = 1.0, **kw: object) -> ReplyPayload:
    rng = _rng(2)
    args: dict[str, object] = dict(
        server_round=7,
        num_seeds=num_seeds,
        num_examples=123,
        seed_indices=rng.integers(0, max(num_seeds, 1), steps),
        projected_grads=(scale * rng.standard_normal(steps)).astype(np.float32),
        train_loss=2.345678,
        num_skipped_steps=3,
        peak_memory_mb=812.25,
        fingerprint=FP,
    )
    args.update(kw)
    return ReplyPayload(**args)  # type: ignore[arg-type]


def _mutated(data: bytes, message: pb.KSeedSync | pb.KSeedReply, edit: Callable[[object], None]) -> bytes:
    message.ParseFromString(data)
    edit(message)
    return message.SerializeToString()


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("pro", [False, True])
def test_dense_sync_round_trip(pro: bool) -> None:
    q = quantize_probabilities(_rng(3).random(K)) if pro else None
    payload = _sync(quantized_probabilities=q)

    decoded = decode_sync(encode_sync(payload))

    assert decoded == payload
    assert decoded.accumulator.dtype == np.float32  # type: ignore[union-attr]
    assert (decoded.quantized_probabilities is None) is (not pro)
    if q is not None:
        np.testing.assert_array_equal(decoded.sampling_probabilities(), probabilities_from_quantized(q))


@pytest.mark.parametrize(("num_seeds", "width"), [(K, pb.INDEX_WIDTH_UINT16), (BIG_K, pb.INDEX_WIDTH_UINT32)])
def test_sparse_sync_round_trip(num_seeds: int, width: int) -> None:
    rng = _rng(4)
    idx = np.unique(np.append(rng.integers(0, num_seeds, 300), num_seeds - 1))
    delta = SparseDelta(base_round=4, indices=idx, values=rng.standard_normal(idx.size).astype(np.float32))
    q = quantize_probabilities(rng.random(num_seeds))
    payload = _sync(num_seeds=num_seeds, accumulator=delta, quantized_probabilities=q)

    data = encode_sync(payload)
    decoded = decode_sync(data)

    assert decoded == payload
    assert isinstance(decoded.accumulator, SparseDelta)
    assert decoded.accumulator.indices.dtype == np.uint32
    wire = pb.KSeedSync.FromString(data)
    assert wire.sparse_delta.index_width == width
    assert len(wire.sparse_delta.indices) == idx.size * (2 if width == pb.INDEX_WIDTH_UINT16 else 4)


def test_sync_lr_survives_bit_exact() -> None:
    payload = _sync(lr=3e-7, eps=1e-3 / 3)
    decoded = decode_sync(encode_sync(payload))
    assert (decoded.lr, decoded.eps) == (3e-7, 1e-3 / 3)


@pytest.mark.parametrize(("num_seeds", "itemsize"), [(K, 2), (BIG_K, 4)])
def test_fp32_reply_round_trip_and_index_width(num_seeds: int, itemsize: int) -> None:
    idx = _rng(5).integers(0, num_seeds, TAU)
    idx[0] = num_seeds - 1  # the widest index must survive packing
    payload = _reply(num_seeds=num_seeds, seed_indices=idx)

    data = encode_reply(payload)
    decoded = decode_reply(data, num_seeds=num_seeds)

    assert decoded == payload
    assert decoded.seed_indices.dtype == np.int64 and decoded.projected_grads.dtype == np.float32
    assert len(pb.KSeedReply.FromString(data).seed_indices) == TAU * itemsize


def test_fp16_reply_within_half_precision() -> None:
    payload = _reply(scale=50.0)

    decoded = decode_reply(encode_reply(payload, scalar_dtype="float16"), num_seeds=K)

    assert decoded.projected_grads.dtype == np.float32
    np.testing.assert_allclose(decoded.projected_grads, payload.projected_grads, rtol=2.0**-11, atol=6e-8)
    assert not np.array_equal(decoded.projected_grads, payload.projected_grads)  # it really was fp16
    np.testing.assert_array_equal(decoded.seed_indices, payload.seed_indices)
    assert decoded.train_loss == payload.train_loss


def test_fp16_accepts_the_largest_half_value() -> None:
    payload = _reply(steps=2, projected_grads=np.array([FP16_MAX, -FP16_MAX], dtype=np.float32))
    decoded = decode_reply(encode_reply(payload, scalar_dtype="float16"), num_seeds=K)
    np.testing.assert_array_equal(decoded.projected_grads, [FP16_MAX, -FP16_MAX])


def test_fp16_refuses_overflow_instead_of_clipping() -> None:
    grads = np.zeros(TAU, dtype=np.float32)
    grads[17] = -70000.0
    payload = _reply(projected_grads=grads)
    with pytest.raises(PayloadError, match=r"projected_grads\[17\].*overflows float16.*float32"):
        encode_reply(payload, scalar_dtype="float16")
    assert decode_reply(encode_reply(payload), num_seeds=K).projected_grads[17] == -70000.0


def test_reply_with_no_steps_round_trips() -> None:
    payload = _reply(steps=0, num_skipped_steps=TAU)
    assert decode_reply(encode_reply(payload), num_seeds=K) == payload


def test_payloads_are_immutable_and_own_their_arrays() -> None:
    grads = np.ones(TAU, dtype=np.float32)
    payload = _reply(projected_grads=grads)
    grads[0] = 99.0
    assert payload.projected_grads[0] == 1.0
    with pytest.raises(ValueError, match="read-only"):
        payload.projected_grads[0] = 5.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        payload.train_loss = 0.0  # type: ignore[misc]
    assert payload != _reply(projected_grads=np.full(TAU, 2.0, dtype=np.float32))


# ----------------------------------------------------------------------------- the 18 KB budget
def test_round_fits_in_18_kilobytes_and_compact_mode_is_smaller() -> None:
    sync = encode_sync(_sync())
    reply = encode_reply(_reply(num_skipped_steps=0))
    compact = encode_reply(_reply(num_skipped_steps=0), scalar_dtype="float16")
    wide = encode_reply(_reply(num_seeds=BIG_K, num_skipped_steps=0))
    total = len(sync) + len(reply)
    print(
        f"\nK={K} tau={TAU}: sync={len(sync)} B, reply fp32={len(reply)} B, total={total} B "
        f"(budget 18432); reply fp16={len(compact)} B, total {len(sync) + len(compact)} B; "
        f"reply fp32+uint32 indices (K={BIG_K})={len(wide)} B"
    )

    assert total <= 18 * 1024
    assert 4 * K < len(sync) <= 4 * K + 128  # the accumulator plus a small, fixed header
    assert len(reply) - len(compact) == 2 * TAU  # fp16 saves exactly two bytes per step
    assert len(wide) - len(reply) == 2 * TAU  # uint16 indices save exactly two bytes per step


# ----------------------------------------------------------------------------- FedKSeed-Pro helpers
def test_quantize_probabilities_min_max_normalizes() -> None:
    np.testing.assert_array_equal(quantize_probabilities(np.array([2.0, 4.0, 3.0])), [0, 255, 127])
    np.testing.assert_array_equal(quantize_probabilities(np.full(5, 0.7)), np.zeros(5, dtype=np.uint8))


def test_probabilities_from_quantized_is_softmax_of_q_over_255() -> None:
    q = np.array([0, 255, 128, 0], dtype=np.uint8)

    p = probabilities_from_quantized(q)

    expected = np.exp(q / 255.0) / np.exp(q / 255.0).sum()
    np.testing.assert_allclose(p, expected, rtol=1e-15)
    assert p.dtype == np.float64 and abs(p.sum() - 1.0) < 1e-12
    assert p[1] / p[0] == pytest.approx(np.e)
    np.testing.assert_array_equal(_sync().sampling_probabilities(), np.full(K, 1.0 / K))


@pytest.mark.parametrize(
    "scores", [np.array([]), np.array([1.0, np.nan]), np.ones((2, 2)), np.array(["a"])], ids=str
)
def test_quantize_probabilities_rejects_bad_scores(scores: npt.NDArray[np.generic]) -> None:
    with pytest.raises(ValueError, match="scores"):
        quantize_probabilities(scores)


@pytest.mark.parametrize("q", [np.array([0.5, 0.5]), np.zeros(0, dtype=np.uint8), np.zeros((2, 2), np.uint8)])
def test_probabilities_from_quantized_rejects_bad_input(q: npt.NDArray[np.generic]) -> None:
    with pytest.raises(ValueError, match="uint8"):
        probabilities_from_quantized(q)


# ----------------------------------------------------------------------------- constructor validation
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lr": 0.0}, "lr=0.0 must be > 0"),
        ({"eps": float("nan")}, "eps=nan is not finite"),
        ({"num_local_steps": 0}, r"num_local_steps=0 is outside \[1"),
        ({"batch_size": True}, "batch_size must be an int"),
        ({"server_round": -1}, "server_round=-1 is outside"),
        ({"fingerprint": ""}, "fingerprint must be a str of 1..128"),
        ({"fingerprint": "dïgest"}, "printable ASCII"),
        ({"accumulator": np.zeros(K, dtype=np.float64)}, "1-D float32"),
        ({"accumulator": np.zeros(K - 1, dtype=np.float32)}, f"has {K - 1} entries, expected {K}"),
        ({"accumulator": np.full(K, np.inf, dtype=np.float32)}, "NaN or Inf"),
        ({"quantized_probabilities": np.zeros(K, dtype=np.int8)}, "uint8"),
        ({"quantized_probabilities": np.zeros(3, dtype=np.uint8)}, "uint8"),
        (
            {"accumulator": SparseDelta(base_round=7, indices=np.array([1]), values=np.ones(1, np.float32))},
            "base_round=7 must be < server_round=7",
        ),
        (
            {"accumulator": SparseDelta(base_round=1, indices=np.array([K]), values=np.ones(1, np.float32))},
            f"reach {K} but num_seeds={K}",
        ),
    ],
)
def test_sync_payload_validation(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _sync(**kw)


@pytest.mark.parametrize(
    ("indices", "values", "match"),
    [
        ([3, 3], [1.0, 2.0], "strictly increasing"),
        ([5, 2], [1.0, 2.0], "strictly increasing"),
        ([-1], [1.0], r"must lie in \[0"),
        ([1.5], [1.0], "integer"),
        ([1, 2], [1.0], "has 1 entries, expected 2"),
    ],
)
def test_sparse_delta_validation(indices: list[float], values: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseDelta(base_round=0, indices=np.array(indices), values=np.array(values, dtype=np.float32))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"seed_indices": np.array([0, K])}, r"must lie in \[0, num_seeds=4096\)"),
        ({"seed_indices": np.zeros(TAU - 1, dtype=np.int64)}, "send exactly one projected_grad per"),
        ({"projected_grads": np.zeros(TAU)}, "1-D float32"),
        ({"projected_grads": np.full(TAU, np.nan, dtype=np.float32)}, "NaN or Inf"),
        ({"num_examples": -1}, "num_examples=-1 is outside"),
        ({"num_skipped_steps": 1.0}, "num_skipped_steps must be an int"),
        ({"train_loss": 1e39}, "not finite at float32 precision"),
        ({"peak_memory_mb": -1.0}, "must be >= 0"),
        ({"num_seeds": 0}, "num_seeds=0 is outside"),
    ],
)
def test_reply_payload_validation(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _reply(**kw)


def test_encoder_argument_errors() -> None:
    with pytest.raises(ValueError, match="scalar_dtype must be"):
        encode_reply(_reply(), scalar_dtype="bfloat16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SyncPayload"):
        encode_sync(_reply())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ReplyPayload"):
        encode_reply(_sync())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- untrusted sync bytes
def _bad_sync(edit: Callable[[pb.KSeedSync], None], payload: SyncPayload | None = None) -> bytes:
    return _mutated(encode_sync(payload or _sync()), pb.KSeedSync(), edit)  # type: ignore[arg-type]


def _set(obj: object, name: str, value: object) -> None:
    setattr(obj, name, value)


_SPARSE = SparseDelta(base_round=2, indices=np.array([1, 5, 9]), values=np.ones(3, np.float32))

SYNC_CASES: list[tuple[str, bytes, str]] = [
    ("garbage", b"\xff\xff\xff\xff", "malformed KSeedSync protobuf"),
    ("empty", b"", "schema_version 0 is not supported"),
    (
        "future-version",
        _bad_sync(lambda m: _set(m, "schema_version", 2)),
        "schema_version 2 is not supported",
    ),
    ("no-accumulator", _bad_sync(lambda m: m.ClearField("dense")), "no accumulator"),
    ("dense-odd-bytes", _bad_sync(lambda m: _set(m.dense, "values", b"\0" * 4097)), "not a multiple of 4"),
    ("dense-short", _bad_sync(lambda m: _set(m.dense, "values", b"\0" * 8)), "has 2 entries, expected 4096"),
    (
        "dense-nan",
        _bad_sync(lambda m: _set(m.dense, "values", np.full(K, np.nan, "<f4").tobytes())),
        "NaN or Inf",
    ),
    ("num-seeds-0", _bad_sync(lambda m: _set(m, "num_seeds", 0)), "num_seeds=0"),
    ("lr-negative", _bad_sync(lambda m: _set(m, "lr", -1.0)), "lr=-1.0 must be > 0"),
    ("lr-inf", _bad_sync(lambda m: _set(m, "lr", float("inf"))), "lr=inf is not finite"),
    ("tau-0", _bad_sync(lambda m: _set(m, "num_local_steps", 0)), "num_local_steps=0"),
    ("no-fingerprint", _bad_sync(lambda m: _set(m, "fingerprint", "")), "fingerprint"),
    ("probs-short", _bad_sync(lambda m: _set(m, "quantized_probabilities", b"\1" * 10)), "uint8\\[num_seeds"),
    (
        "sparse-width-unset",
        _bad_sync(lambda m: _set(m.sparse_delta, "index_width", 0), _sync(accumulator=_SPARSE)),
        "unknown index_width 0",
    ),
    (
        "sparse-odd-bytes",
        _bad_sync(lambda m: _set(m.sparse_delta, "indices", b"\1\0\2"), _sync(accumulator=_SPARSE)),
        "not a multiple of 2",
    ),
    (
        "sparse-out-of-range",
        _bad_sync(
            lambda m: _set(m.sparse_delta, "indices", np.array([1, 5, K], "<u2").tobytes()),
            _sync(accumulator=_SPARSE),
        ),
        f"reach {K} but num_seeds={K}",
    ),
    (
        "sparse-unsorted",
        _bad_sync(
            lambda m: _set(m.sparse_delta, "indices", np.array([5, 1, 9], "<u2").tobytes()),
            _sync(accumulator=_SPARSE),
        ),
        "strictly increasing",
    ),
    (
        "sparse-length-mismatch",
        _bad_sync(lambda m: _set(m.sparse_delta, "values", b"\0" * 8), _sync(accumulator=_SPARSE)),
        "has 2 entries, expected 3",
    ),
    (
        "sparse-base-not-earlier",
        _bad_sync(lambda m: _set(m.sparse_delta, "base_round", 7), _sync(accumulator=_SPARSE)),
        "must be < server_round",
    ),
]


@pytest.mark.parametrize(("data", "match"), [c[1:] for c in SYNC_CASES], ids=[c[0] for c in SYNC_CASES])
def test_decode_sync_rejects_untrusted_input(data: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        decode_sync(data)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="expects bytes"):
        decode_sync("not bytes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- untrusted reply bytes
def _bad_reply(edit: Callable[[pb.KSeedReply], None], *, scalar_dtype: str = "float32") -> bytes:
    data = encode_reply(_reply(), scalar_dtype=scalar_dtype)  # type: ignore[arg-type]
    return _mutated(data, pb.KSeedReply(), edit)  # type: ignore[arg-type]


REPLY_CASES: list[tuple[str, bytes, str]] = [
    ("garbage", b"\x0a\xff", "malformed KSeedReply protobuf"),
    ("empty", b"", "schema_version 0 is not supported"),
    (
        "future-version",
        _bad_reply(lambda m: _set(m, "schema_version", 9)),
        "schema_version 9 is not supported",
    ),
    ("indices-odd-bytes", _bad_reply(lambda m: _set(m, "seed_indices", b"\0" * 399)), "not a multiple of 2"),
    ("grads-odd-bytes", _bad_reply(lambda m: _set(m, "projected_grads", b"\0" * 798)), "not a multiple of 4"),
    (
        "fp16-odd-bytes",
        _bad_reply(lambda m: _set(m, "projected_grads", b"\0" * 399), scalar_dtype="float16"),
        "not a multiple of 2",
    ),
    (
        "length-mismatch",
        _bad_reply(lambda m: _set(m, "projected_grads", b"\0" * 4 * (TAU - 1))),
        "200 seed_indices but 199 projected_grads",
    ),
    (
        "grads-nan",
        _bad_reply(lambda m: _set(m, "projected_grads", np.full(TAU, np.nan, "<f4").tobytes())),
        "NaN or Inf",
    ),
    (
        "fp16-inf",
        _bad_reply(
            lambda m: _set(m, "projected_grads", np.full(TAU, np.inf, "<f2").tobytes()),
            scalar_dtype="float16",
        ),
        "NaN or Inf",
    ),
    (
        "index-out-of-range",
        _bad_reply(lambda m: _set(m, "seed_indices", np.full(TAU, K, "<u2").tobytes())),
        r"must lie in \[0, num_seeds=4096\)",
    ),
    ("width-unset", _bad_reply(lambda m: _set(m, "index_width", 0)), "unknown index_width 0"),
    ("width-unknown", _bad_reply(lambda m: _set(m, "index_width", 7)), "unknown index_width 7"),
    ("dtype-unset", _bad_reply(lambda m: _set(m, "scalar_dtype", 0)), "unknown scalar_dtype 0"),
    ("loss-nan", _bad_reply(lambda m: _set(m, "train_loss", float("nan"))), "train_loss=nan is not finite"),
    ("memory-negative", _bad_reply(lambda m: _set(m, "peak_memory_mb", -2.0)), "peak_memory_mb=-2.0"),
    ("bad-fingerprint", _bad_reply(lambda m: _set(m, "fingerprint", "a\nb")), "printable ASCII"),
]


@pytest.mark.parametrize(("data", "match"), [c[1:] for c in REPLY_CASES], ids=[c[0] for c in REPLY_CASES])
def test_decode_reply_rejects_untrusted_input(data: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        decode_reply(data, num_seeds=K)


def test_decode_reply_checks_indices_against_the_callers_pool() -> None:
    payload = _reply(num_seeds=BIG_K, seed_indices=np.full(TAU, 70_000))
    data = encode_reply(payload)
    assert decode_reply(data, num_seeds=BIG_K) == payload
    with pytest.raises(PayloadError, match="num_seeds=65536"):
        decode_reply(data, num_seeds=65_536)
    with pytest.raises(ValueError, match="num_seeds=0"):
        decode_reply(data, num_seeds=0)


def test_payload_error_is_a_value_error() -> None:
    assert issubclass(PayloadError, ValueError)


def test_wire_package_does_not_import_flower_or_grpc() -> None:
    import subprocess
    import sys

    code = "import sys, fedtune.wire; print(sorted(m for m in ('flwr', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
