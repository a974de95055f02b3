"""Gaussian directions of engine v2: Philox4x32-10 counters mapped through a 4,096-level inverse-CDF table.

Engine v1 drew Gaussian z with torch's ``normal_`` (mt19937 and Box-Muller): about 4 ns per value on this
project's 2-core reference machine, a stream that can only be read in order, and values that may differ in
the last bit between CPU instruction sets (``log``/``sin`` come from the platform). A counter-based generator
(Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011) computes any block of a stream from
its counter alone, vectorizes, and uses integer arithmetic only; mapping 12 bits at a time through a fixed
table keeps libm out of the run-time path, so the values are the same on every platform. Measured on one
core: 0.2 ns per value to generate and 0.3 ns to gather and add, against torch's 4 ns to generate.

Layout (part of :data:`.perturbation.ENGINE_VERSION`): the value ``8b + 2j + h`` of tensor ``position``
under seed ``seed_index`` is ``TABLE[((w_j >> 16h) & 0xFFFF) >> 4]``, where ``(w_0, w_1, w_2, w_3)`` is
Philox4x32-10 of the counter ``(b, position, seed_index, 0)`` under the run's 64-bit key. Distinct
(seed, tensor, block) triples are distinct counters, and Philox is a bijection for a fixed key, so no two
blocks of a run collide.

``TABLE[i] = q_i / s`` with ``q_i`` the standard normal quantile at ``(i + 1/2) / 4096`` and ``s`` the root
mean square of the ``q_i``: z takes 4,096 equiprobable values, symmetric, with mean 0 and variance 1 exactly
over the table, ``|z| < 3.7``, and a Kolmogorov distance to N(0, 1) below ``2**-12``. The zeroth-order
estimator needs only ``E[z z^T] = I`` (Rademacher, two values, is the extreme case).

numpy's Philox is the 4x64 variant and torch has no CPU Philox, so the generator is written here; the
tests check it against the Random123 known-answer vectors.
"""

from __future__ import annotations

import hashlib
import statistics
import sys
from collections.abc import Callable
from functools import cache
from typing import Any, cast

import numba
import numpy as np
import numpy.typing as npt
from numba.extending import intrinsic

LEVELS = 1 << 12
"""Distinct Gaussian values: the top 12 bits of each 16-bit half of a Philox word index them. A 16 KiB table
stays in L1 while the kernels stream; a 65,536-entry one (256 KiB) lives in L2 and made every gather twice as
slow (measured: 0.58 against 0.29 ns per value)."""
VALUES_PER_BLOCK = 8
"""Values per Philox4x32 block: four 32-bit words, two 16-bit halves each."""
ROUNDS = 10
PIECE = 1 << 15
"""Values generated per inner piece: the words (64 KiB), the accumulator piece and the table stay in L2."""

_U32, _U64 = np.uint32, np.uint64
_M0, _M1 = _U64(0xD2511F53), _U64(0xCD9E8D57)  # Philox4x32 round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_LO, _S32 = _U64(0xFFFFFFFF), _U64(32)
_SHIFT = np.uint16(4)  # a 16-bit half's top 12 bits are the table index

if sys.byteorder != "little":  # the kernels read a word's 16-bit halves through a uint16 view (2x faster)
    raise ImportError("fedtune's zeroth-order engine needs a little-endian host")


def round_keys(key: tuple[int, int]) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
    """The ten per-round keys of a Philox4x32-10 key ``(k0, k1)``: ``k + r * W mod 2**32``."""
    k0, k1 = (int(k) for k in key)
    if not (0 <= k0 < 2**32 and 0 <= k1 < 2**32):
        raise ValueError(f"a Philox4x32 key is two 32-bit words, got {key!r}")
    r = np.arange(ROUNDS, dtype=np.uint64)
    return (
        ((k0 + r * _W0) & 0xFFFFFFFF).astype(np.uint32),
        ((k1 + r * _W1) & 0xFFFFFFFF).astype(np.uint32),
    )


def _philox_words(words: Any, first_block: int, c1: Any, c2: Any, rk0: Any, rk1: Any) -> None:
    """``words[4b:4b+4]`` = Philox4x32-10 of counter ``(first_block + b, c1, c2, 0)`` (mod 2**32 in b)."""
    for b in range(words.size // 4):
        x0 = _U64(_U32(first_block + b))
        x1 = _U64(c1)
        x2 = _U64(c2)
        x3 = _U64(0)
        for r in range(ROUNDS):
            p0 = _M0 * x0
            p1 = _M1 * x2
            x0, x1, x2, x3 = (
                (p1 >> _S32) ^ x1 ^ _U64(rk0[r]),
                p1 & _LO,
                (p0 >> _S32) ^ x3 ^ _U64(rk1[r]),
                p0 & _LO,
            )
        words[4 * b] = _U32(x0)
        words[4 * b + 1] = _U32(x1)
        words[4 * b + 2] = _U32(x2)
        words[4 * b + 3] = _U32(x3)


_philox_words_jit = numba.njit(inline="always")(_philox_words)


@intrinsic
def _fma32(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """``a * b + c`` rounded once (float32). numba offers no fused multiply-add, and torch's
    ``add_(z, alpha=a)`` fuses, so the compiled and the torch paths (cached z, accelerators) agree bit for
    bit only if this kernel fuses too; LLVM emits one FMA instruction where the CPU has it."""
    del typingctx, a, b, c

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fma(*args)

    return numba.types.float32(numba.types.float32, numba.types.float32, numba.types.float32), codegen


_fma = cast(Callable[[Any, Any, Any], Any], _fma32)  # as the kernels call it (numba supplies typingctx)


def _sum_into(
    target: Any, table: Any, rk0: Any, rk1: Any, c1: int, seeds: Any, coefs: Any, start: int
) -> None:
    """``target[i] += sum_s coefs[s] * z_s[start + i]``, every seed's piece summed in L2 before ``target``
    (seed by seed, as ``acc.add_(z_s, alpha=c_s)`` would: chained single-rounding FMAs in seed order)."""
    words = np.empty((4, PIECE // 2), dtype=np.uint32)
    acc = np.empty(PIECE, dtype=np.float32)
    n = target.size
    for at in range(0, n, PIECE):
        m = min(PIECE, n - at)
        n_words = (m + 7) // 8 * 4
        a = acc[:m]
        a[:] = 0.0
        for s0 in range(0, seeds.size, 4):
            # Four seeds per sweep over the accumulator: one load and store of it per four gathers.
            k = min(4, seeds.size - s0)
            for j in range(k):
                seed = _U32(seeds[s0 + j])
                _philox_words_jit(words[j, :n_words], (start + at) // 8, _U32(c1), seed, rk0, rk1)
            h0 = words[0, :n_words].view(np.uint16)
            h1 = words[1, :n_words].view(np.uint16)
            h2 = words[2, :n_words].view(np.uint16)
            h3 = words[3, :n_words].view(np.uint16)
            c0 = np.float32(coefs[s0])
            if k == 4:
                d1, d2, d3 = np.float32(coefs[s0 + 1]), np.float32(coefs[s0 + 2]), np.float32(coefs[s0 + 3])
                for i in range(m):
                    x = _fma(c0, table[h0[i] >> _SHIFT], a[i])
                    x = _fma(d1, table[h1[i] >> _SHIFT], x)
                    x = _fma(d2, table[h2[i] >> _SHIFT], x)
                    a[i] = _fma(d3, table[h3[i] >> _SHIFT], x)
            else:
                for j in range(k):
                    c = np.float32(coefs[s0 + j])
                    h = words[j, :n_words].view(np.uint16)
                    for i in range(m):
                        a[i] = _fma(c, table[h[i] >> _SHIFT], a[i])
        for i in range(m):
            target[at + i] += a[i]


def _axpy(target: Any, table: Any, rk0: Any, rk1: Any, c1: int, c2: int, alpha: float, start: int) -> None:
    """``target[i] += alpha * z[start + i]`` (float32), generated piece by piece."""
    words = np.empty(PIECE // 2, dtype=np.uint32)
    a = np.float32(alpha)
    n = target.size
    for at in range(0, n, PIECE):
        m = min(PIECE, n - at)
        w = words[: (m + 7) // 8 * 4]
        _philox_words_jit(w, (start + at) // 8, _U32(c1), _U32(c2), rk0, rk1)
        h = w.view(np.uint16)
        for i in range(m):
            target[at + i] = _fma(a, table[h[i] >> _SHIFT], target[at + i])


# nogil: the engine's worker threads run kernels side by side; cache: compiled once per install.
_sum_into_jit = numba.njit(_sum_into, nogil=True, cache=True)
_axpy_jit = numba.njit(_axpy, nogil=True, cache=True)
_words_jit = numba.njit(_philox_words, nogil=True, cache=True)


@cache
def gaussian_table() -> npt.NDArray[np.float32]:
    """The 4,096 values of z in index order (read-only float32), built once from exact float64 quantiles.

    Built from the lower half and mirrored, so the table is exactly antisymmetric and its mean is 0.
    """
    normal = statistics.NormalDist()
    lower = np.array([normal.inv_cdf((i + 0.5) / LEVELS) for i in range(LEVELS // 2)], dtype=np.float64)
    q = np.concatenate([lower, -lower[::-1]])
    table: npt.NDArray[np.float32] = (q / np.sqrt(np.mean(q * q))).astype(np.float32)
    table.setflags(write=False)
    return table


def table_digest() -> str:
    """Hex sha256 of the table as little-endian float32 (pinned by the tests: a platform whose quantiles
    round differently would generate other directions)."""
    return hashlib.sha256(gaussian_table().astype("<f4").tobytes()).hexdigest()


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """One Philox4x32-10 block (the known-answer form: any 128-bit counter)."""
    rk0, rk1 = round_keys(key)
    c0, c1, c2, c3 = (int(c) for c in counter)
    if not all(0 <= c < 2**32 for c in counter):
        raise ValueError(f"a Philox4x32 counter is four 32-bit words, got {counter!r}")
    # The kernel fixes the counter's last word at 0; fold a non-zero one into the first round's key, which
    # Philox XORs in at the same place (x3 only enters round 1 through that XOR).
    rk1 = rk1.copy()
    rk1[0] ^= np.uint32(c3)
    words = np.empty(4, dtype=np.uint32)
    _words_jit(words, c0, _U32(c1), _U32(c2), rk0, rk1)
    return (int(words[0]), int(words[1]), int(words[2]), int(words[3]))


def _check_key(rk: tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]) -> None:
    for k in rk:
        if k.dtype != np.uint32 or k.shape != (ROUNDS,):
            raise ValueError("round keys must come from round_keys()")


def _check_start(start: int, c1: int, c2: int) -> None:
    if start < 0 or start % VALUES_PER_BLOCK:
        raise ValueError(f"start must be a non-negative multiple of {VALUES_PER_BLOCK}, got {start}")
    if not (0 <= c1 < 2**32 and 0 <= c2 < 2**32):
        raise ValueError("position and seed index must fit 32 bits")


def _check_f32(a: npt.NDArray[Any], what: str) -> None:
    if a.dtype != np.float32 or a.ndim != 1 or not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{what} must be a writable contiguous 1-D float32 array")


def _check_axpy(
    a: npt.NDArray[Any],
    what: str,
    rk: tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]],
    position: int,
    seed_index: int,
    start: int,
) -> None:
    """The checks of the one-seed kernels, before anything is written."""
    _check_f32(a, what)
    _check_key(rk)
    _check_start(start, position, seed_index)


def fill_gaussian_(
    out: npt.NDArray[np.float32],
    rk: tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]],
    position: int,
    seed_index: int,
    start: int = 0,
) -> None:
    """``out[i] = z[start + i]`` for one tensor's direction (``start`` a multiple of 8)."""
    _check_axpy(out, "out", rk, position, seed_index, start)
    out[:] = 0.0  # then out = fma(1, z, 0) = z exactly: the axpy kernel serves both
    _axpy_jit(out, gaussian_table(), rk[0], rk[1], position, seed_index, 1.0, start)


def add_gaussian_(
    target: npt.NDArray[np.float32],
    rk: tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]],
    position: int,
    seed_index: int,
    alpha: float,
    start: int = 0,
) -> None:
    """``target += alpha * z[start:start + target.size]`` in one pass, z never materialized."""
    _check_axpy(target, "target", rk, position, seed_index, start)
    _axpy_jit(target, gaussian_table(), rk[0], rk[1], position, seed_index, float(alpha), start)


def add_gaussian_sum_(
    target: npt.NDArray[np.float32],
    rk: tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]],
    position: int,
    seed_indices: npt.NDArray[np.int64],
    coefficients: npt.NDArray[np.float64],
    start: int = 0,
) -> None:
    """``target += sum_s c_s z_s[start:start + target.size]``; each piece of the sum is formed in L2 (in
    float32, seeds in the given order) and added to ``target`` once."""
    _check_f32(target, "target")
    _check_key(rk)
    seeds = np.ascontiguousarray(seed_indices, dtype=np.int64)
    coefs = np.ascontiguousarray(coefficients, dtype=np.float64)
    if seeds.ndim != 1 or seeds.shape != coefs.shape:
        raise ValueError("seed_indices and coefficients must be equal-length 1-D arrays")
    if seeds.size and (seeds.min() < 0 or seeds.max() >= 2**32):
        raise ValueError("seed indices must fit 32 bits")
    _check_start(start, position, 0)
    if seeds.size:
        _sum_into_jit(target, gaussian_table(), rk[0], rk[1], position, seeds, coefs, start)
