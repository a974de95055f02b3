"""Cryptographically secure standard normals for privacy noise (SAP, arXiv:2312.15603).

The d_chi-privacy guarantee of Feyisetan et al. 2020 ("Privacy- and Utility-Preserving Textual Analysis via
Calibrated Multivariate Perturbations") holds only if the noise is unpredictable to the server. A seeded PRNG
(torch, numpy: Mersenne Twister, Philox, PCG64) is not a CSPRNG: its state can be recovered from its output
or guessed from the seed, and the noise then subtracted. So all privacy noise here comes from a ChaCha20
keystream keyed from ``os.urandom``.

Written by hand because no well-kept library offers CSPRNG normals for torch: torchcsprng is unmaintained
and numpy/torch generators only accept seeds for their own (non-cryptographic) bit generators.
"""

from __future__ import annotations

import os
import threading
from typing import NoReturn

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

KEY_BYTES = 32
# One (key, nonce) pair serves at most 2^31 ChaCha20 blocks (128 GiB): well before the 32-bit block counter
# of RFC 8439 could wrap (the wrap behaviour differs between backends), the next nonce takes over.
_SEGMENT_BYTES = 1 << 37
# Keystream is made by encrypting zeros in pieces of this size, so a large request needs no large input.
_CHUNK_BYTES = 1 << 20
_ZEROS = bytes(_CHUNK_BYTES)
_TWO_PI = 2.0 * np.pi


def _nonce(segment: int) -> bytes:
    """16-byte ChaCha20 nonce: block counter 0 in the low 8 bytes, the segment index in the high 8.

    Putting the index in the last 8 bytes keeps nonces distinct whether a backend reads the first 4 or 8
    bytes as the block counter.
    """
    return bytes(8) + segment.to_bytes(8, "little")


class SecureNormal:
    """Standard normals from a ChaCha20 keystream (cryptography's ChaCha20), converted with Box-Muller.

    ``key=None`` (the only choice outside tests) draws a fresh key from ``os.urandom``. An explicit 32-byte
    key makes the stream reproducible, which is what tests need and what real noise must never have.
    One encryptor is kept so the keystream continues across calls; a (key, nonce) pair is never restarted.
    Safe to share between threads: drawing keystream is serialized by a lock.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(KEY_BYTES)
        elif not isinstance(key, bytes | bytearray | memoryview):
            raise TypeError(f"key must be bytes (32 bytes), got {type(key).__name__}")
        key = bytes(key)
        if len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)} (or None for a random key)")
        self._key = key
        self._lock = threading.Lock()
        self._segment = 0
        self._segment_bytes = _SEGMENT_BYTES
        self._used = 0
        self._encryptor: CipherContext = self._new_encryptor()

    def _new_encryptor(self) -> CipherContext:
        return Cipher(algorithms.ChaCha20(self._key, _nonce(self._segment)), mode=None).encryptor()

    def __getstate__(self) -> NoReturn:
        # A copy would continue the same keystream, i.e. emit the same noise twice.
        raise TypeError("SecureNormal cannot be pickled or copied: two copies would emit identical noise")

    def _fill(self, out: memoryview) -> None:
        """Write the next ``len(out)`` keystream bytes into ``out`` (caller holds the lock)."""
        pos = 0
        while pos < len(out):
            if self._used == self._segment_bytes:
                self._segment += 1
                self._used = 0
                self._encryptor = self._new_encryptor()
            step = min(len(out) - pos, _CHUNK_BYTES, self._segment_bytes - self._used)
            self._encryptor.update_into(memoryview(_ZEROS)[:step], out[pos : pos + step])
            pos += step
            self._used += step

    def _words(self, n: int) -> np.ndarray:
        """``n`` uniform 64-bit words (uint64) from the keystream."""
        n = _count(n)
        out = np.empty(n, dtype=np.uint64)
        with self._lock:
            self._fill(out.view(np.uint8).data)
        return out

    def normal(self, n: int) -> np.ndarray:
        """A float64 array of ``n`` iid N(0, 1) draws.

        Each pair of 64-bit words becomes two uniforms with 53 random bits: ``u1 = (k + 1) / 2^53`` lies in
        (0, 1] so ``log(u1)`` is finite, ``u2 = k / 2^53`` in [0, 1); Box-Muller turns them into two normals.
        For odd ``n`` the last normal of the last pair is dropped; the keystream still moves on. For even
        ``n``, ``normal(n)`` then ``normal(m)`` equals ``normal(n + m)`` from the same key.
        """
        n = _count(n)
        pairs = (n + 1) // 2
        w = self._words(2 * pairs)
        w >>= np.uint64(11)
        u = w.astype(np.float64).reshape(pairs, 2)  # pair j = words 2j, 2j+1: even calls split exactly
        u *= 2.0**-53
        radius = u[:, 0] + 2.0**-53  # (k + 1) / 2^53: exact, in (0, 1]
        np.log(radius, out=radius)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        angle = u[:, 1]
        angle *= _TWO_PI
        z = np.empty((pairs, 2), dtype=np.float64)
        np.cos(angle, out=z[:, 0])
        np.sin(angle, out=z[:, 1])
        z *= radius[:, None]
        return z.reshape(-1)[:n]


def _count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return int(n)
