"""``acc += sum_k c_k s_k`` for 16 Rademacher directions at once, through one table lookup per value.

Applying seeds one by one expands and adds a full pass of signs per seed. Eight seeds' sign bits for one
value form a byte; two such bytes index a 65,536-entry table of the signed sums of the 16 coefficients, so
16 seeds cost one gather and one add. The bytes come from the packed signs by an 8x8 bit transpose of each
64-bit word made of the eight seeds' bytes (Hacker's Delight, section 7-3). Neither torch nor numpy gathers
bits across arrays this way, hence the hand-written kernel; it runs on cache-sized chunks so its
temporaries stay in L2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

GROUP = 16
"""Seeds combined per table lookup: two bytes of sign bits index a 65,536-entry table (256 KiB, in L2)."""
BYTE = 8

# Per step: mask of the bits that swap and the distance they move (the three steps of the 8x8 transpose).
_TRANSPOSE_STEPS = ((0x00AA00AA00AA00AA, 7), (0x0000CCCC0000CCCC, 14), (0x00000000F0F0F0F0, 28))
_BITS = ((np.arange(256)[:, None] >> np.arange(BYTE)) & 1).astype(np.float64) * 2.0 - 1.0


def sum_table(values: Sequence[float]) -> npt.NDArray[np.float64]:
    """(256,): entry b is ``sum_k values[k] * (+1 if bit k of b else -1)``; missing seeds count zero."""
    if len(values) > BYTE:
        raise ValueError(f"a byte table combines at most {BYTE} seeds, got {len(values)}")
    coef = np.zeros(BYTE)
    coef[: len(values)] = values
    return _BITS @ coef


def group_table(values: Sequence[float]) -> torch.Tensor:
    """float32 table of a group's signed sums: 256 entries for up to 8 seeds, 65,536 for up to 16.

    Entry ``lo + 256 * hi`` sums the first eight seeds' signs from byte ``lo`` and the rest from ``hi``. It
    depends only on the coefficients, so one table serves every tensor.
    """
    if not 1 <= len(values) <= GROUP:
        raise ValueError(f"a group has 1 to {GROUP} seeds, got {len(values)}")
    low = sum_table(values[:BYTE])
    if len(values) <= BYTE:
        return torch.from_numpy(low.astype(np.float32))
    high = sum_table(values[BYTE:])
    return torch.from_numpy((low[None, :] + high[:, None]).reshape(-1).astype(np.float32))


def transpose_bits(words: torch.Tensor) -> torch.Tensor:
    """8x8 bit transpose of each int64 word: bit ``8r + c`` moves to bit ``8c + r`` (in place)."""
    for mask, shift in _TRANSPOSE_STEPS:
        # Arithmetic right shifts only fill bits that the mask clears, so signed int64 is safe.
        t = torch.bitwise_xor(words, words >> shift).bitwise_and_(mask)
        words.bitwise_xor_(t).bitwise_xor_(t << shift)
    return words


def interleave(packed: Sequence[torch.Tensor], n_bytes: int) -> torch.Tensor:
    """int64 word j holds byte j of each of up to eight packed vectors (byte k from vector k; zeros after)."""
    device = packed[0].device
    columns = [p[:n_bytes] for p in packed]
    columns += [torch.zeros(n_bytes, dtype=torch.uint8, device=device)] * (BYTE - len(columns))
    return torch.stack(columns, dim=1).view(torch.int64).view(-1)


class SignSumWorkspace:
    """Scratch for one worker: adds up to 16 packed sign vectors at a time into flat float32 accumulators."""

    def __init__(self, device: torch.device, chunk: int) -> None:
        if chunk <= 0 or chunk % 64:
            raise ValueError(f"chunk must be a positive multiple of 64, got {chunk}")
        self.chunk = chunk
        self.device = device
        self.words = torch.empty(2, chunk // 8, dtype=torch.int64, device=device)
        self.index = torch.empty(2, chunk, dtype=torch.int32, device=device)
        self.values = torch.empty(chunk, dtype=torch.float32, device=device)

    def add_group_(self, acc: torch.Tensor, packed: Sequence[torch.Tensor], table: torch.Tensor) -> None:
        """``acc += sum_k values[k] * signs(packed[k])`` for the group whose :func:`group_table` is given."""
        n = acc.numel()
        n_bytes = (n + 7) // 8
        wide = table.numel() == 1 << (2 * BYTE)
        if not 1 <= len(packed) <= (GROUP if wide else BYTE) or (wide and len(packed) <= BYTE):
            raise ValueError("pass the packed vectors of exactly the seeds the table was built for")
        if any(p.numel() < n_bytes for p in packed):
            raise ValueError(f"every packed vector needs {n_bytes} bytes for {n} values")
        # Byte k of word j is seed k's byte j: after the transpose, byte i of word j holds the eight
        # seeds' bits for value 8j + i.
        sources = [interleave(packed[i : i + BYTE], n_bytes) for i in range(0, len(packed), BYTE)]
        for start in range(0, n, self.chunk):
            stop = min(n, start + self.chunk)
            w0, w1 = start // 8, (stop + 7) // 8
            index = self.index[0, : stop - start]
            for h, source in enumerate(sources):
                words = self.words[h, : w1 - w0]
                transpose_bits(words.copy_(source[w0:w1]))
                if h == 0:
                    index.copy_(words.view(torch.uint8)[: stop - start])
                else:
                    high = self.index[1, : stop - start]
                    index.add_(high.copy_(words.view(torch.uint8)[: stop - start]), alpha=256)
            out = self.values[: stop - start]
            torch.index_select(table, 0, index, out=out)
            acc[start:stop].add_(out)
