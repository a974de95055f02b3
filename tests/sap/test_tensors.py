"""ndarray <-> Tensor: exact round trips and every refusal of an untrusted Tensor."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune._proto.v1 import split_pb2
from fedtune.sap.tensors import from_tensor, to_tensor

FLOATS = ("<f4", "<f2")


@pytest.mark.parametrize(
    ("dtype", "wire"), [(np.float32, "<f4"), (np.float16, "<f2"), (np.int64, "<i8"), (np.uint8, "|u1")]
)
def test_round_trip(dtype: type[np.generic], wire: str) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((2, 3, 5)) * 50).astype(dtype)
    t = to_tensor(arr)
    assert t.dtype == wire and list(t.shape) == [2, 3, 5] and t.data == arr.tobytes()
    back = from_tensor(split_pb2.Tensor.FromString(t.SerializeToString()), name="x", dtypes={wire})
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert not back.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        back[0, 0, 0] = 1


def test_non_contiguous_and_big_endian_inputs_are_normalized() -> None:
    arr = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]  # big-endian, strided
    t = to_tensor(arr)
    assert t.dtype == "<f4"
    np.testing.assert_array_equal(from_tensor(t, name="x", dtypes=FLOATS), arr)
    mask = to_tensor(np.array([[True, False]]))
    assert mask.dtype == "|b1"
    np.testing.assert_array_equal(from_tensor(mask, name="m", dtypes={"|b1"}), [[True, False]])


def _tensor(data: bytes, shape: list[int], dtype: str) -> split_pb2.Tensor:
    return split_pb2.Tensor(data=data, shape=shape, dtype=dtype)


@pytest.mark.parametrize(
    ("t", "kwargs", "match"),
    [
        (_tensor(b"\0" * 8, [1], "<f8"), {}, r"acts: dtype '<f8' is not allowed"),
        (_tensor(b"\0" * 4, [1], "f4"), {}, "not allowed"),  # no explicit byte order
        (split_pb2.Tensor(), {}, "dtype '' is not allowed"),  # an unset message field
        (_tensor(b"\0" * 12, [3], "<f4"), {"ndim": 2}, "expected rank 2"),
        (_tensor(b"", [], "<f4"), {}, "rank 0"),
        (_tensor(b"", [2, 0], "<f4"), {}, "must be positive"),
        (_tensor(b"", [-1], "<f4"), {}, "must be positive"),
        (_tensor(b"\0" * 8, [3], "<f4"), {}, "8 bytes do not match"),
        (_tensor(b"\0" * 16, [3], "<f4"), {}, "16 bytes do not match"),
        (_tensor(b"\0" * 40, [10], "<f4"), {"max_elements": 9}, "10 elements .* exceed the limit 9"),
        (_tensor(b"", [2**40, 2**40], "<f4"), {}, "exceed the limit"),  # checked before the length
        (_tensor(np.array([1.0, np.nan], "<f4").tobytes(), [2], "<f4"), {}, "1 of 2 values are NaN"),
        (_tensor(np.array([np.inf], "<f2").tobytes(), [1], "<f2"), {}, "NaN or infinite"),
    ],
)
def test_refusals(t: split_pb2.Tensor, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_tensor(t, name="acts", dtypes=FLOATS, **kwargs)


def test_other_refusals() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        from_tensor(_tensor(b"\x02", [1], "|b1"), name="m", dtypes={"|b1"})
    with pytest.raises(ValueError, match="not a plain numeric dtype"):
        from_tensor(_tensor(b"\0" * 8, [1], "|O"), name="m", dtypes={"|O"})
    with pytest.raises(ValueError, match="collection"):
        from_tensor(_tensor(b"\0" * 4, [1], "<f4"), name="m", dtypes="<f4")
    with pytest.raises(ValueError, match="ndarray"):
        to_tensor([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot go on the wire"):
        to_tensor(np.array(["a"]))
    with pytest.raises(ValueError, match="no empty dimension"):
        to_tensor(np.zeros((2, 0), np.float32))
    with pytest.raises(ValueError, match="rank"):
        to_tensor(np.array(1.0, np.float32))
    ints = from_tensor(to_tensor(np.array([-100, 5], np.int64)), name="labels", dtypes={"<i8"}, ndim=1)
    assert ints.tolist() == [-100, 5]  # integers are not checked for finiteness
