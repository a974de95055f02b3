"""Gaussian noise for differential privacy from a cryptographically secure generator.

A ChaCha20 keystream (``cryptography``) keyed from ``os.urandom`` gives uniform 53-bit floats;
Box-Muller turns them into normals in float64. Nothing here can be derived from the run's shared
seeds, and the global torch/numpy generators are never touched. Hand-written because Opacus'
``secure_mode`` needs torchcsprng, whose last release (0.2.1, 2021) does not build with current
torch, and numpy's generators (PCG64, Philox) are not cryptographically secure.
"""

from __future__ import annotations

import math
import os

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_CHUNK = 1 << 20  # normals per keystream request: bounds the temporary buffers


class SecureGaussian:
    """N(0, std^2) draws from one ChaCha20 stream with a fresh random 256-bit key per instance.

    The nonce is fixed because each key is used once; the 128-bit counter never wraps for any
    amount of noise a run can draw.
    """

    def __init__(self) -> None:
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None)
        self._stream = cipher.encryptor()

    def _uniform(self, n: int) -> npt.NDArray[np.float64]:
        """n floats uniform on (0, 1): 53 random bits each, never exactly 0 (log is safe)."""
        raw = np.frombuffer(self._stream.update(bytes(8 * n)), dtype="<u8")
        return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2.0**53)

    def normal(self, size: int, std: float) -> npt.NDArray[np.float64]:
        """``size`` independent N(0, std^2) draws (float64)."""
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"noise std must be a finite number >= 0, got {std}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        out = np.empty(size, dtype=np.float64)
        for start in range(0, size, _CHUNK):
            n = min(_CHUNK, size - start)
            pairs = (n + 1) // 2
            u1, u2 = self._uniform(pairs), self._uniform(pairs)
            r = np.sqrt(-2.0 * np.log(u1))
            z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
            out[start : start + n] = z[:n]
        return out * std

    def uniform(self, size: int) -> npt.NDArray[np.float64]:
        """``size`` independent uniforms on (0, 1), e.g. for secret Poisson subsampling masks."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        return self._uniform(size)

    def scalar(self, std: float) -> float:
        return float(self.normal(1, std)[0])

    def normal_like(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        """Noise of ``tensor``'s shape, dtype and device (drawn on the CPU, then moved)."""
        noise = self.normal(tensor.numel(), std).reshape(tuple(tensor.shape))
        return torch.from_numpy(noise).to(device=tensor.device, dtype=tensor.dtype)
