"""Fixed-point encoding of float vectors into the ring Z_{2^64}, where masks add and cancel.

A coordinate x becomes ``round(clip(x, -c, c) * 2^f)`` as int64 viewed as uint64; numpy's uint64
arithmetic wraps modulo 2^64, so sums of encodings and masks need no explicit reduction. A sum of n
encodings, viewed back as int64 and divided by 2^f, is the sum of the clipped inputs to within
``n * 2^-(f+1)`` (each client rounds to nearest). The constructor refuses settings where n clipped
inputs could overflow the signed range, since a wrapped sum decodes to garbage without any error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U64Array = npt.NDArray[np.uint64]
F64Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Quantizer:
    """Encode/decode with ``fraction_bits`` fractional bits and coordinate bound ``clip``.

    ``max_clients`` is the largest number of encodings that will be summed (the sampled clients).
    """

    fraction_bits: int
    clip: float
    max_clients: int

    def __post_init__(self) -> None:
        f, c, n = self.fraction_bits, self.clip, self.max_clients
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= 62:
            raise ValueError(f"fraction_bits must be an int in [0, 62], got {f!r}")
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"clip must be a positive finite number, got {c!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_clients must be an int >= 1, got {n!r}")
        if n * c * 2.0**f >= 2.0**63:
            raise ValueError(
                f"{n} clients x clip {c} x 2^{f} overflows the 2^64 modulus (the sum must stay below 2^63); "
                "lower fraction-bits or clip, or sample fewer clients"
            )

    @property
    def scale(self) -> float:
        return 2.0**self.fraction_bits

    def max_sum_error(self, n: int) -> float:
        """Worst-case per-coordinate error of a decoded sum of ``n`` encodings (round-to-nearest)."""
        return n * 2.0 ** -(self.fraction_bits + 1)

    def encode(self, vector: npt.ArrayLike) -> tuple[U64Array, int]:
        """``(encoding, clipped)``: the uint64 encoding and how many coordinates ``clip`` cut.

        NaN and Inf are refused (np.clip would keep NaN and poison the whole sum undetectably).
        """
        x = np.asarray(vector, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"secagg encodes 1-D vectors, got shape {x.shape}; flatten it first")
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise ValueError(
                f"vector holds NaN or Inf (first at position {bad}); training diverged: skip this client's "
                "update or lower the learning rate"
            )
        clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        q = np.rint(np.clip(x, -self.clip, self.clip) * self.scale).astype(np.int64)
        return q.view(np.uint64), clipped

    def decode(self, total: U64Array) -> F64Array:
        """The float sum from a uint64 sum of encodings (two's complement, divided by 2^f)."""
        arr = np.asarray(total)
        if arr.dtype != np.uint64 or arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D uint64 array, got {arr.ndim}-D {arr.dtype}")
        out: F64Array = arr.view(np.int64).astype(np.float64) / self.scale
        return out
