"""Validation helpers for wire payloads: every check raises ValueError saying what to fix."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Final

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

MAX_FINGERPRINT_CHARS: Final = 128
UINT32_MAX: Final = 2**32 - 1
UINT64_MAX: Final = 2**64 - 1


def check_uint(name: str, value: object, *, minimum: int = 0, maximum: int = UINT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}; pass a Python int")
    if not minimum <= int(value) <= maximum:
        raise ValueError(f"{name}={value} is outside [{minimum}, {maximum}]; pass a value in that range")
    return int(value)


def check_finite_float(name: str, value: object, *, positive: bool = False, float32: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    with np.errstate(over="ignore"):  # overflow to inf is reported below
        out = float(np.float32(value)) if float32 else float(value)
    if not math.isfinite(out):
        where = " at float32 precision" if float32 else ""
        raise ValueError(f"{name}={value} is not finite{where}; report a finite value")
    if positive and out <= 0.0:
        raise ValueError(f"{name}={value} must be > 0")
    return out


def check_ascii_text(what: str, value: object, max_chars: int, *, hint: str, ascii_hint: str) -> str:
    """A str of 1..``max_chars`` printable ASCII characters (names and digests on the wire)."""
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        raise ValueError(f"{what} must be a str of 1..{max_chars} characters, got {value!r:.60}; {hint}")
    if not (value.isascii() and value.isprintable()):
        raise ValueError(f"{what} {value!r:.60} must be printable ASCII; {ascii_hint}")
    return value


def check_fingerprint(value: object) -> str:
    return check_ascii_text(
        "fingerprint",
        value,
        MAX_FINGERPRINT_CHARS,
        hint="pass a hex digest of the model and perturbation settings",
        ascii_hint="use a hex digest",
    )


def readonly(arr: npt.NDArray[np.generic]) -> None:
    arr.flags.writeable = False


def check_float_array(name: str, value: object, length: int | None = None) -> FloatArray:
    arr = np.asarray(value)
    if arr.dtype != np.float32 or arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D float32 array, got {arr.ndim}-D {arr.dtype}; "
            "build it with np.asarray(..., dtype=np.float32)"
        )
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {length}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name} holds NaN or Inf (first at position {bad}); drop or skip those steps")
    out = arr.astype(np.float32, copy=True)
    readonly(out)
    return out


def check_index_array(
    name: str, value: object, num_seeds: int, dtype: type[np.integer]
) -> npt.NDArray[np.integer]:
    arr = np.asarray(value)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got {arr.ndim}-D {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_seeds):
        raise ValueError(
            f"{name} must lie in [0, num_seeds={num_seeds}), got range [{arr.min()}, {arr.max()}]; "
            "indices address the shared pool of num_seeds seeds"
        )
    out = arr.astype(dtype, copy=True)
    readonly(out)
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and np.array_equal(a, b)
        )
    return a == b


class ArrayEq:
    """Field-wise equality that compares arrays by dtype and value (dataclass eq would raise)."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]
