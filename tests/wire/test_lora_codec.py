"""Federated-LoRA wire codec: exact round trips, kept order, exact size and untrusted-input rejection."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fedtune._proto.v1 import lora_pb2 as pb
from fedtune.wire import (
    LORA_SCHEMA_VERSION,
    MAX_ARRAY_DIMS,
    MAX_ARRAY_NAME_CHARS,
    AdapterReplyPayload,
    AdapterSyncPayload,
    PayloadError,
    arrays_equal,
    decode_adapter_reply,
    decode_adapter_sync,
    encode_adapter_reply,
    encode_adapter_sync,
)
from fedtune.wire.dp_report import DPFigures

Q_A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"
RANK, HIDDEN = 8, 64


def _rng(tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([20240602, tag]))


def _arrays(tag: int = 1) -> dict[str, npt.NDArray[np.float32]]:
    rng = _rng(tag)
    return {
        Q_A: rng.standard_normal((RANK, HIDDEN)).astype(np.float32),
        Q_B: rng.standard_normal((HIDDEN, RANK)).astype(np.float32),
        "extra.scale": rng.standard_normal(3).astype(np.float32),
    }


def _sync(**kw: Any) -> AdapterSyncPayload:
    args: dict[str, Any] = {"server_round": 7, "arrays": _arrays()}
    args.update(kw)
    return AdapterSyncPayload(**args)


def _reply(**kw: Any) -> AdapterReplyPayload:
    args: dict[str, Any] = {
        "server_round": 7,
        "num_examples": 123,
        "train_loss": 2.345678,
        "peak_memory_mb": 812.25,
        "arrays": _arrays(2),
    }
    args.update(kw)
    return AdapterReplyPayload(**args)


def _f32(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


# ----------------------------------------------------------------------------- round trips
def test_sync_round_trip() -> None:
    payload = _sync()

    decoded = decode_adapter_sync(encode_adapter_sync(payload))

    assert decoded == payload
    assert list(decoded.arrays) == [Q_A, Q_B, "extra.scale"]
    assert decoded.arrays[Q_A].shape == (RANK, HIDDEN) and decoded.arrays[Q_B].shape == (HIDDEN, RANK)
    assert all(a.dtype == np.float32 for a in decoded.arrays.values())
    np.testing.assert_array_equal(decoded.arrays[Q_B], _arrays()[Q_B])


def test_reply_round_trip_is_exact_after_float32_rounding() -> None:
    payload = _reply()

    decoded = decode_adapter_reply(encode_adapter_reply(payload))

    assert decoded == payload
    assert payload.train_loss == float(np.float32(2.345678)) != 2.345678  # stored rounded, as sent
    assert (decoded.num_examples, decoded.peak_memory_mb) == (123, 812.25)


def test_reply_round_trips_extreme_counters() -> None:
    payload = _reply(server_round=2**32 - 1, num_examples=2**64 - 1, peak_memory_mb=0.0)
    assert decode_adapter_reply(encode_adapter_reply(payload)) == payload


def test_multi_dimensional_arrays_keep_c_order() -> None:
    cube = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    fortran = np.asfortranarray(cube)
    payload = _sync(arrays={"cube": fortran, "max-dims": np.ones((1,) * MAX_ARRAY_DIMS, np.float32)})

    data = encode_adapter_sync(payload)

    assert pb.AdapterSync.FromString(data).arrays[0].data == cube.astype("<f4").tobytes()
    decoded = decode_adapter_sync(data)
    np.testing.assert_array_equal(decoded.arrays["cube"], cube)
    assert decoded.arrays["max-dims"].shape == (1,) * MAX_ARRAY_DIMS


def test_array_order_is_kept_on_encode_and_decode() -> None:
    forward = _arrays()
    backward = dict(reversed(forward.items()))

    a, b = encode_adapter_sync(_sync(arrays=forward)), encode_adapter_sync(_sync(arrays=backward))

    assert [x.name for x in pb.AdapterSync.FromString(b).arrays] == list(backward)
    assert list(decode_adapter_sync(b).arrays) == list(backward)
    assert a != b
    assert _sync(arrays=forward) != _sync(arrays=backward)  # order is part of the encoding


def test_non_native_float32_is_accepted_and_stored_native() -> None:
    big_endian = np.arange(4, dtype=">f4")
    payload = _sync(arrays={"w": big_endian})
    assert payload.arrays["w"].dtype == np.float32 and payload.arrays["w"].dtype.isnative
    np.testing.assert_array_equal(decode_adapter_sync(encode_adapter_sync(payload)).arrays["w"], [0, 1, 2, 3])


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode_adapter_sync(_sync())
    by_array, by_view = bytearray(data), memoryview(data)
    assert decode_adapter_sync(by_array) == decode_adapter_sync(by_view) == _sync()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- exact size
def test_minimal_sync_has_the_exact_protobuf_size() -> None:
    # AdapterSync: schema_version (2) + server_round (2) + arrays tag/len (2) + NamedArray (20), where
    # NamedArray = name "a" (3) + packed shape [3] (3) + data tag/len (2) + 3 float32 (12).
    assert len(encode_adapter_sync(AdapterSyncPayload(7, {"a": np.zeros(3, np.float32)}))) == 26


def test_reply_size_is_four_bytes_per_element_plus_a_small_header() -> None:
    payload = _reply()
    elements = sum(a.size for a in payload.arrays.values())
    names = sum(len(n) for n in payload.arrays)

    size = len(encode_adapter_reply(payload))

    assert 4 * elements + names < size <= 4 * elements + names + 12 * len(payload.arrays) + 32
    # One more element costs exactly four more bytes (no varint length crosses a boundary here).
    grown = dict(payload.arrays, **{"extra.scale": np.zeros(4, np.float32)})
    assert len(encode_adapter_reply(_reply(arrays=grown))) == size + 4


# ----------------------------------------------------------------------------- immutability, equality
def test_payload_owns_read_only_arrays_in_an_immutable_mapping() -> None:
    source = {"w": np.ones(4, dtype=np.float32)}
    payload = _sync(arrays=source)
    source["w"][0] = 99.0
    source["other"] = np.ones(1, np.float32)

    assert payload.arrays["w"][0] == 1.0 and list(payload.arrays) == ["w"]
    with pytest.raises(ValueError, match="read-only"):
        payload.arrays["w"][0] = 5.0
    with pytest.raises(TypeError):
        payload.arrays["w"] = np.zeros(4, np.float32)  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        payload.server_round = 1  # type: ignore[misc]


def test_decoded_arrays_are_read_only_and_detached_from_the_bytes() -> None:
    decoded = decode_adapter_reply(encode_adapter_reply(_reply()))
    for arr in decoded.arrays.values():
        assert not arr.flags.writeable and arr.flags.owndata and arr.flags.c_contiguous


def test_equality_compares_names_shapes_dtypes_and_values() -> None:
    base = {"w": _f32(1.0, 2.0, 3.0, 4.0)}
    assert _sync(arrays=base) == _sync(arrays={"w": _f32(1.0, 2.0, 3.0, 4.0)})
    assert _sync(arrays=base) != _sync(arrays={"v": _f32(1.0, 2.0, 3.0, 4.0)})
    assert _sync(arrays=base) != _sync(arrays={"w": _f32(1.0, 2.0, 3.0, 4.0).reshape(2, 2)})
    assert _sync(arrays=base) != _sync(arrays={"w": _f32(1.0, 2.0, 3.0, 5.0)})
    assert _sync(arrays=base) != _sync(arrays=base, server_round=8)
    assert _reply() != _reply(num_examples=124)
    assert _reply() != _reply(train_loss=0.5)
    assert _reply() != _reply(peak_memory_mb=1.0)
    assert _sync() != _reply() and _sync() != "not a payload"
    with pytest.raises(TypeError, match="unhashable"):
        hash(_sync())


def test_arrays_equal_checks_dtype() -> None:
    a = {"w": _f32(1.0, 2.0)}
    assert arrays_equal(a, {"w": _f32(1.0, 2.0)})
    assert not arrays_equal(a, {"w": np.array([1.0, 2.0])})  # float64 with equal values
    assert not arrays_equal(a, {"w": _f32(1.0, 2.0), "v": _f32(1.0)})


# ----------------------------------------------------------------------------- constructor validation
@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({}, "arrays is empty"),
        ([("w", _f32(1.0))], "must be a mapping"),
        ({"": _f32(1.0)}, "name must be a str of 1..256"),
        ({"x" * (MAX_ARRAY_NAME_CHARS + 1): _f32(1.0)}, "name must be a str of 1..256"),
        ({7: _f32(1.0)}, "name must be a str"),
        ({"wéight": _f32(1.0)}, "printable ASCII"),
        ({"a\nb": _f32(1.0)}, "printable ASCII"),
        ({"w": np.ones(3)}, "must be float32, got float64"),
        ({"w": np.ones(3, dtype=np.int32)}, "must be float32, got int32"),
        ({"w": np.ones(3, dtype=np.float16)}, "must be float32, got float16"),
        ({"w": np.float32(1.0)}, "has 0 dimensions, expected 1..8"),
        ({"w": np.ones((1,) * (MAX_ARRAY_DIMS + 1), np.float32)}, "has 9 dimensions, expected 1..8"),
        ({"w": np.ones((4, 0), np.float32)}, "zero dimension"),
        ({"w": _f32(1.0, np.nan)}, r"NaN or Inf \(first at index \(1,\)\)"),
        ({"w": np.array([[1.0, 2.0], [np.inf, 0.0]], np.float32)}, r"first at index \(1, 0\)"),
    ],
    ids=repr,
)
def test_arrays_validation(arrays: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _sync(arrays=arrays)
    with pytest.raises(ValueError, match=match):
        _reply(arrays=arrays)


def test_name_at_the_length_limit_is_accepted() -> None:
    name = "n" * MAX_ARRAY_NAME_CHARS
    assert list(decode_adapter_sync(encode_adapter_sync(_sync(arrays={name: _f32(1.0)}))).arrays) == [name]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"server_round": -1}, "server_round=-1 is outside"),
        ({"server_round": 2**32}, "server_round=4294967296 is outside"),
        ({"num_examples": 0}, r"num_examples=0 is outside \[1, "),
        ({"num_examples": True}, "num_examples must be an int"),
        ({"num_examples": 2**64}, "num_examples=18446744073709551616 is outside"),
        ({"train_loss": float("nan")}, "train_loss=nan is not finite"),
        ({"train_loss": 1e39}, "not finite at float32 precision"),
        ({"train_loss": "0.5"}, "train_loss must be a real number"),
        ({"peak_memory_mb": -1.0}, "peak_memory_mb=-1.0 must be >= 0"),
        ({"peak_memory_mb": float("inf")}, "peak_memory_mb=inf is not finite"),
    ],
    ids=repr,
)
def test_reply_scalar_validation(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _reply(**kw)


def test_sync_server_round_validation() -> None:
    with pytest.raises(ValueError, match="server_round must be an int"):
        _sync(server_round=1.0)


def test_encoder_argument_errors() -> None:
    with pytest.raises(TypeError, match="AdapterSyncPayload"):
        encode_adapter_sync(_reply())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AdapterReplyPayload"):
        encode_adapter_reply(_sync())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- untrusted bytes
def _set(obj: object, name: str, value: object) -> None:
    setattr(obj, name, value)


def _named(name: str, shape: list[int], data: bytes) -> pb.NamedArray:
    return pb.NamedArray(name=name, shape=shape, data=data)


def _edit_sync(edit: Callable[[pb.AdapterSync], None]) -> bytes:
    msg = pb.AdapterSync.FromString(encode_adapter_sync(_sync()))
    edit(msg)
    return msg.SerializeToString()


def _edit_reply(edit: Callable[[pb.AdapterReply], None]) -> bytes:
    msg = pb.AdapterReply.FromString(encode_adapter_reply(_reply()))
    edit(msg)
    return msg.SerializeToString()


def _append(msg: pb.AdapterSync | pb.AdapterReply, item: pb.NamedArray) -> None:
    msg.arrays.append(item)


def _replace_first(msg: pb.AdapterSync | pb.AdapterReply, item: pb.NamedArray) -> None:
    msg.arrays[0].CopyFrom(item)


_FOUR = np.ones(4, "<f4").tobytes()
_SYNC_BYTES = encode_adapter_sync(_sync())

# (id, bytes, match) for decode_adapter_sync; the array checks are shared with decode_adapter_reply.
SYNC_CASES: list[tuple[str, bytes, str]] = [
    ("garbage", b"\xff\xff\xff\xff", "malformed AdapterSync protobuf"),
    ("truncated", _SYNC_BYTES[:-1], "malformed AdapterSync protobuf"),
    ("truncated-mid", _SYNC_BYTES[: len(_SYNC_BYTES) // 2], "malformed AdapterSync protobuf"),
    ("empty", b"", "schema_version 0 is not supported"),
    ("future-version", _edit_sync(lambda m: _set(m, "schema_version", 2)), "schema_version 2 is not"),
    ("no-arrays", _edit_sync(lambda m: m.ClearField("arrays")), "arrays is empty"),
    ("duplicate-name", _edit_sync(lambda m: _append(m, _named(Q_A, [4], _FOUR))), f"repeats the name '{Q_A}"),
    ("empty-name", _edit_sync(lambda m: _append(m, _named("", [4], _FOUR))), r"arrays\[3\]: array name must"),
    ("long-name", _edit_sync(lambda m: _append(m, _named("x" * 257, [4], _FOUR))), "1..256 characters"),
    ("non-ascii-name", _edit_sync(lambda m: _append(m, _named("ä", [4], _FOUR))), "printable ASCII"),
    ("no-shape", _edit_sync(lambda m: _replace_first(m, _named("w", [], _FOUR))), "declares 0 dimensions"),
    ("nine-dims", _edit_sync(lambda m: _replace_first(m, _named("w", [1] * 9, _FOUR))), "declares 9 dim"),
    ("odd-bytes", _edit_sync(lambda m: _replace_first(m, _named("w", [4], _FOUR[:-1]))), "not a multiple of"),
    (
        "shape-too-big",
        _edit_sync(lambda m: _replace_first(m, _named("w", [5], _FOUR))),
        r"declares shape \[5\] \(5 elements\) but carries 4 float32",
    ),
    (
        "shape-too-small",
        _edit_sync(lambda m: _replace_first(m, _named("w", [1, 3], _FOUR))),
        r"declares shape \[1, 3\] \(3 elements\) but carries 4",
    ),
    (
        "lying-huge-shape",  # must be refused before any allocation
        _edit_sync(lambda m: _replace_first(m, _named("w", [2**32 - 1, 2**32 - 1], _FOUR))),
        "but carries 4 float32 elements",
    ),
    ("zero-dim", _edit_sync(lambda m: _replace_first(m, _named("w", [0], b""))), "zero dimension"),
    (
        "nan",
        _edit_sync(lambda m: _replace_first(m, _named("w", [2, 2], _f32(1, 2, np.nan, 4).tobytes()))),
        r"invalid AdapterSync: array 'w' holds NaN or Inf \(first at index \(1, 0\)\)",
    ),
    (
        "inf",
        _edit_sync(lambda m: _replace_first(m, _named("w", [2], _f32(-np.inf, 0).tobytes()))),
        "NaN or Inf",
    ),
]


@pytest.mark.parametrize(("data", "match"), [c[1:] for c in SYNC_CASES], ids=[c[0] for c in SYNC_CASES])
def test_decode_sync_rejects_untrusted_input(data: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        decode_adapter_sync(data)


REPLY_CASES: list[tuple[str, bytes, str]] = [
    ("garbage", b"\x0a\xff", "malformed AdapterReply protobuf"),
    ("truncated", encode_adapter_reply(_reply())[:-3], "malformed AdapterReply protobuf"),
    ("empty", b"", "schema_version 0 is not supported"),
    ("future-version", _edit_reply(lambda m: _set(m, "schema_version", 3)), "schema_version 3 is not"),
    ("no-examples", _edit_reply(lambda m: _set(m, "num_examples", 0)), r"num_examples=0 is outside \[1"),
    ("loss-nan", _edit_reply(lambda m: _set(m, "train_loss", float("nan"))), "train_loss=nan is not finite"),
    ("loss-inf", _edit_reply(lambda m: _set(m, "train_loss", float("inf"))), "train_loss=inf is not finite"),
    ("memory-negative", _edit_reply(lambda m: _set(m, "peak_memory_mb", -2.0)), "peak_memory_mb=-2.0"),
    ("no-arrays", _edit_reply(lambda m: m.ClearField("arrays")), "arrays is empty"),
    ("duplicate-name", _edit_reply(lambda m: _append(m, _named(Q_B, [4], _FOUR))), "repeats the name"),
    (
        "shape-mismatch",
        _edit_reply(lambda m: _replace_first(m, _named("w", [2, 3], _FOUR))),
        r"AdapterReply array 'w' declares shape \[2, 3\]",
    ),
    (
        "nan",
        _edit_reply(lambda m: _replace_first(m, _named("w", [1], _f32(np.nan).tobytes()))),
        "invalid AdapterReply: array 'w' holds NaN",
    ),
]


@pytest.mark.parametrize(("data", "match"), [c[1:] for c in REPLY_CASES], ids=[c[0] for c in REPLY_CASES])
def test_decode_reply_rejects_untrusted_input(data: bytes, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        decode_adapter_reply(data)


def test_every_truncation_is_refused_or_visibly_loses_arrays() -> None:
    """protobuf has no end marker: a cut exactly between two arrays parses; it never yields a wrong array."""
    payload = _sync(arrays={"a": _f32(1.0, 2.0), "b": _f32(3.0, 4.0, 5.0)})
    data = encode_adapter_sync(payload)
    parsed = []
    for cut in range(len(data)):
        try:
            decoded = decode_adapter_sync(data[:cut])
        except PayloadError:
            continue
        parsed.append(cut)
        assert list(decoded.arrays) == ["a"] and arrays_equal(decoded.arrays, {"a": _f32(1.0, 2.0)})
    assert len(parsed) == 1  # only the cut right after array "a"; the caller's name check catches it


def test_a_reply_is_not_mistaken_for_a_sync() -> None:
    with pytest.raises(PayloadError):
        decode_adapter_sync(encode_adapter_reply(_reply()))


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="expects bytes"):
        decode_adapter_sync("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expects bytes"):
        decode_adapter_reply(None)  # type: ignore[arg-type]


def test_schema_version_on_the_wire() -> None:
    assert pb.AdapterSync.FromString(encode_adapter_sync(_sync())).schema_version == LORA_SCHEMA_VERSION
    assert pb.AdapterReply.FromString(encode_adapter_reply(_reply())).schema_version == LORA_SCHEMA_VERSION


# ----------------------------------------------------------------------------- DP figures
DP = DPFigures(noise_multiplier=1.25, sample_rate=0.1, steps=10, clip=0.5)


def test_reply_carries_dp_figures_exactly_and_none_when_absent() -> None:
    private = _reply(dp=DP)
    back = decode_adapter_reply(encode_adapter_reply(private))
    assert back == private and back.dp == DP
    plain = decode_adapter_reply(encode_adapter_reply(_reply()))
    assert plain.dp is None and plain != private
    # without figures the encoding is the pre-DP one: old readers and writers agree byte for byte
    assert not pb.AdapterReply.FromString(encode_adapter_reply(_reply())).HasField("dp")


def test_reply_dp_must_be_figures() -> None:
    with pytest.raises(ValueError, match="dp must be DPFigures"):
        _reply(dp={"noise_multiplier": 1.0})


@pytest.mark.parametrize(
    ("field", "value"),
    [("noise_multiplier", 0.0), ("sample_rate", 1.5), ("steps", 0), ("clip", float("nan"))],
)
def test_decode_reply_rejects_dp_figures_no_honest_client_sends(field: str, value: float) -> None:
    def edit(m: pb.AdapterReply) -> None:
        m.dp.CopyFrom(DP.to_pb())
        setattr(m.dp, field, value)

    with pytest.raises(PayloadError, match="invalid AdapterReply: DP"):
        decode_adapter_reply(_edit_reply(edit))
