"""One tensor's Gaussian direction generated piece by piece, equal to generating it in one call.

Generating a whole tensor's z with ``normal_`` writes it out of cache before the update reads it back; pieces
of about a megabyte stay in L2 between generation and use (measured on 2 cores: 3.3 against 5.0 ns per value)
and need one piece of scratch per worker instead of one largest tensor. Nothing in torch offers a resumable
normal stream, so this module reproduces, piece by piece, the stream that one ``Tensor.normal_`` call over
``n >= 16`` contiguous float32 values consumes (ATen's ``normal_fill``): it draws ``n`` uniforms, turns
each aligned block of 16 into normals (Box-Muller), and when ``n % 16 != 0`` draws 16 fresh uniforms for the
last 16 values. So pieces whose lengths are multiples of 16 give the same values as the one call, and the
last piece skips ``n % 16`` uniforms and redoes the last 16. ``tests/zo/test_zo_gaussian_chunks.py`` checks
the equality for many sizes; :func:`fedtune.zo.fingerprint.z_checksum` compares values between parties.
"""

from __future__ import annotations

import torch

BLOCK = 16
"""Values ATen's vectorised normal fill transforms together."""


def piece_bounds(numel: int, chunk: int) -> list[tuple[int, int]]:
    """Pieces ``[start, stop)`` covering ``numel`` values: multiples of ``chunk`` but the last.

    A tensor of at most ``chunk + 2 * BLOCK`` values is one piece (one plain ``normal_`` call). Otherwise
    the last piece holds at least ``2 * BLOCK`` values, so redoing its last 16 stays inside it.
    """
    if chunk <= 0 or chunk % BLOCK:
        raise ValueError(f"chunk must be a positive multiple of {BLOCK}, got {chunk}")
    if numel <= chunk + 2 * BLOCK:
        return [(0, numel)]
    starts = list(range(0, numel, chunk))
    if numel - starts[-1] < 2 * BLOCK:
        starts.pop()
    return [(a, b) for a, b in zip(starts, [*starts[1:], numel], strict=True)]


class GaussianPieces:
    """The pieces of one tensor's direction, in order, from its own generator.

    Parameters
    ----------
    seed
        The 32-bit torch seed of the tensor's direction (:meth:`Perturbation.gaussian_seed`).
    numel, chunk
        The tensor's size and the piece length (a multiple of 16).
    """

    def __init__(self, seed: int, numel: int, chunk: int) -> None:
        self.bounds = piece_bounds(numel, chunk)
        self.numel = numel
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._next = 0
        self._tail = torch.empty(BLOCK, dtype=torch.float32)

    @property
    def max_piece(self) -> int:
        return max(b - a for a, b in self.bounds)

    def fill(self, out: torch.Tensor) -> torch.Tensor:
        """Write the next piece into ``out[:length]`` (CPU, float32, contiguous) and return that view."""
        if self._next >= len(self.bounds):
            raise RuntimeError("every piece of this direction has been generated")
        start, stop = self.bounds[self._next]
        self._next += 1
        piece = out[: stop - start]
        if start == 0 and stop == self.numel:
            return piece.normal_(generator=self.generator)
        tail = self.numel % BLOCK
        if stop < self.numel or tail == 0:
            return piece.normal_(generator=self.generator)
        aligned = self.numel - tail
        piece[: aligned - start].normal_(generator=self.generator)
        self._tail[:tail].uniform_(generator=self.generator)  # the uniforms normal_fill drew and overwrote
        piece[stop - start - BLOCK :].copy_(self._tail.normal_(generator=self.generator))
        return piece
