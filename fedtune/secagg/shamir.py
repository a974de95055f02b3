"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Written by hand: ``cryptography`` has no secret sharing, and pulling in pycryptodome for these ~60 lines
is not worth a dependency. 2^521 - 1 is a Mersenne prime larger than any 32-byte secret, so a secret is
one field element and a share is one field element (66 bytes on the wire). Coefficients come from
:mod:`secrets`; evaluation points are x = 1..n (a client's index in the sorted participant list + 1).
Any t shares reconstruct the secret by Lagrange interpolation at 0; t - 1 shares are independent of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

PRIME: Final = 2**521 - 1
SECRET_BYTES: Final = 32
SHARE_BYTES: Final = (PRIME.bit_length() + 7) // 8  # 66


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` at each point of ``xs``: any ``threshold`` of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}; share a 32-byte key")
    points = _check_points(xs)
    if not 2 <= threshold <= len(points):
        raise ValueError(
            f"threshold {threshold} must be in [2, {len(points)}] (the number of share holders); "
            "lower the threshold or add holders"
        )
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in points}


def combine(shares: Mapping[int, int] | Iterable[tuple[int, int]], threshold: int) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares ``(x, y)``; refuses fewer and duplicate x.

    Raises ValueError when the interpolated value is not a 32-byte secret: with a 521-bit field a garbled
    (random) share lands below 2^256 only with probability 2^-265, so this catches corrupted shares; it is
    no defence against a share shifted on purpose.
    """
    pairs = list(shares.items()) if isinstance(shares, Mapping) else list(shares)
    _check_points([x for x, _ in pairs])
    if len(pairs) < threshold:
        raise ValueError(f"{len(pairs)} shares cannot reconstruct a secret with threshold {threshold}")
    value = interpolate_at_zero(pairs[:threshold])
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("the shares do not interpolate to a 32-byte secret: at least one share is corrupt")
    return value.to_bytes(SECRET_BYTES, "big")


def interpolate_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """The value at 0 of the lowest-degree polynomial through ``points`` (Lagrange, mod PRIME)."""
    xs = _check_points([x for x, _ in points])
    total = 0
    for i, (xi, yi) in enumerate(points):
        check_share_value(yi)
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def check_share_value(y: object) -> int:
    """``y`` as a field element, or ValueError: a share must be an int in [0, PRIME)."""
    if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < PRIME:
        raise ValueError("a share must be an int in [0, 2^521 - 1); the share is corrupt")
    return y


def share_to_bytes(y: int) -> bytes:
    return check_share_value(y).to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    return check_share_value(int.from_bytes(data, "big"))


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def _check_points(xs: Iterable[int]) -> list[int]:
    points = list(xs)
    for x in points:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < PRIME:
            raise ValueError(f"evaluation point {x!r} must be an int in [1, 2^521 - 2]")
    if len(set(points)) != len(points):
        raise ValueError(f"duplicate evaluation points in {points}; each share holder needs its own x")
    return points
