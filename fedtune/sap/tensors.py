"""ndarray <-> `split_pb2.Tensor`: raw C-order bytes plus shape and an explicit-byte-order dtype.

The split server decodes tensors sent by clients it does not control, so `from_tensor` checks
everything before numpy touches the bytes: an allow-list of dtype strings (no pickled objects, no
structured dtypes), the rank, positive dimensions, an element budget, the exact byte length and,
for floats, finiteness (a NaN activation would silently poison the shared trunk adapter).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedtune._proto.v1 import split_pb2

# Kinds whose raw bytes mean the same on every machine once the byte order is fixed:
# bool, signed and unsigned integers, IEEE floats.
_NUMERIC_KINDS: Final = frozenset("biuf")
MAX_TENSOR_DIMS: Final = 32
DEFAULT_MAX_ELEMENTS: Final = 2**28


def to_tensor(arr: npt.NDArray[Any]) -> split_pb2.Tensor:
    """Serialize ``arr`` (rank >= 1, no empty dimension) as little-endian C-order bytes.

    The dtype string always names its byte order ("<f4", "|u1"), so the receiver never guesses; a
    big-endian input is byte-swapped rather than refused.
    """
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"to_tensor needs a numpy ndarray, got {type(arr).__name__}")
    if arr.dtype.kind not in _NUMERIC_KINDS or arr.dtype.fields is not None or arr.dtype.subdtype:
        raise ValueError(f"dtype {arr.dtype} cannot go on the wire; use bool, int, uint or float")
    if not 1 <= arr.ndim <= MAX_TENSOR_DIMS or 0 in arr.shape:
        raise ValueError(
            f"shape {arr.shape} cannot go on the wire: need rank 1..{MAX_TENSOR_DIMS} and no empty dimension"
        )
    wire_dtype = arr.dtype.newbyteorder("<")
    wire = np.ascontiguousarray(arr, dtype=wire_dtype)
    return split_pb2.Tensor(data=wire.tobytes(order="C"), shape=wire.shape, dtype=wire_dtype.str)


def from_tensor(
    t: split_pb2.Tensor,
    *,
    name: str,
    dtypes: Collection[str],
    ndim: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> npt.NDArray[Any]:
    """Validate ``t`` and view its bytes as an ndarray (read-only, no copy of the message bytes).

    ``dtypes`` are exact wire strings such as ``{"<f4", "<f2"}``; ``ndim`` pins the rank (None:
    any rank 1..32). Every refusal is a ValueError that starts with ``name``, so the split server
    can hand it back to the client as INVALID_ARGUMENT.
    """
    if isinstance(dtypes, str):
        raise ValueError(f"{name}: dtypes must be a collection of dtype strings, not the str {dtypes!r}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype!r} is not allowed here; send one of {sorted(dtypes)}")
    dtype = np.dtype(t.dtype)
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"{name}: dtype {t.dtype!r} is not a plain numeric dtype; fix the allow-list")
    shape = tuple(int(d) for d in t.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected rank {ndim}, got shape {list(shape)}")
    if not 1 <= len(shape) <= MAX_TENSOR_DIMS:
        raise ValueError(f"{name}: rank {len(shape)} is outside 1..{MAX_TENSOR_DIMS} (shape {list(shape)})")
    if any(d <= 0 for d in shape):
        raise ValueError(f"{name}: every dimension must be positive, got shape {list(shape)}")
    elements = math.prod(shape)
    if elements > max_elements:
        raise ValueError(f"{name}: {elements} elements (shape {list(shape)}) exceed the limit {max_elements}")
    data = t.data
    if len(data) != elements * dtype.itemsize:
        raise ValueError(
            f"{name}: {len(data)} bytes do not match shape {list(shape)} x {dtype.itemsize} bytes "
            f"({elements * dtype.itemsize}); send arr.tobytes() in C order"
        )
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise ValueError(f"{name}: {bad} of {elements} values are NaN or infinite")
    elif dtype.kind == "b" and int(np.frombuffer(data, dtype=np.uint8).max()) > 1:
        raise ValueError(f"{name}: bool bytes must be 0 or 1")
    arr.flags.writeable = False
    return arr
