"""Seeded random directions z = Z(run_seed, seed_index, position) that every party regenerates exactly.

FedKSeed (Qin et al., ICML 2024) and MeZO (Malladi et al., NeurIPS 2023) exchange only seed indices and
scalars, so a direction must be a pure function of its key. Values are always drawn on the CPU with an
explicit generator and then copied to the parameter's device, because CUDA streams depend on the GPU model
(pytorch/pytorch#196613) and a shared global generator races between threads.

Engine layout (part of :data:`ENGINE_VERSION`; changing any of it changes every direction):

* one key per (run_seed, seed_index, position), where position is the index of the tensor in the tuned
  order; a tensor's values never depend on how callers chunk their work;
* ``"rademacher"``: the raw 64-bit outputs of numpy's ``PCG64`` seeded by
  ``SeedSequence([ENGINE_TAG, run_seed, seed_index, position])``, read as little-endian bytes; element
  ``i`` is +1 when bit ``i % 8`` of byte ``i // 8`` is set and -1 otherwise. Bit-exact on every platform.
* ``"gaussian"``: Philox4x32-10 of the counter ``(block, position, seed_index, 0)`` under a 64-bit key from
  ``SeedSequence([ENGINE_TAG, run_seed, 1])``, the top 12 bits of each 16-bit half mapped through a
  4,096-entry inverse-CDF table (:mod:`.gaussian_jit`). Integer arithmetic and a table lookup only, so
  bit-exact on every platform; any piece of a tensor's direction is computed from its counters alone.

Version 1 drew Gaussian z with torch's mt19937 ``normal_``; version 2 changed only that, so a version-1 party
or checkpoint is refused (:func:`fedtune.zo.fingerprint.check_compatible` names the engine version).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import torch

from fedtune.zo.gaussian_jit import add_gaussian_, add_gaussian_sum_, fill_gaussian_, round_keys

ENGINE_VERSION = "fedtune-zo/2"
"""Version of the direction layout above; parties with different versions cannot share seeds."""

ENGINE_TAG = 0x46_5A_4F_31  # "FZO1": domain-separates our SeedSequence keys from any other use of run_seed.
_GAUSSIAN_TAG = 1

MAX_SEED_INDEX = 2**20
"""Exclusive upper bound of a seed index (a bound the wire formats and checkpoints validate against)."""
MAX_TENSORS = 2**12
"""Most tensors one run may tune."""
MAX_NUMEL = 2**35
"""Largest tensor the Gaussian layout addresses (2**32 Philox blocks of 8 values)."""

PerturbationKind = Literal["gaussian", "rademacher"]
PERTURBATION_KINDS: tuple[str, ...] = get_args(PerturbationKind)


def generator_id(kind: str) -> str:
    """Name the random-number backend whose exact stream a kind depends on (compared between parties)."""
    if kind == "rademacher":
        return f"numpy-pcg64-raw/{ENGINE_VERSION}"
    return f"philox4x32-10-q16/{ENGINE_VERSION}"


@dataclass(frozen=True)
class Perturbation:
    """The direction generator of one run: kind, run seed and the shapes of the tuned tensors, in order.

    Parameters
    ----------
    kind
        ``"gaussian"`` (N(0, 1) on 4,096 levels, as in MeZO and FedKSeed) or ``"rademacher"``
        (uniform +-1; storable as packed bits, d/8 bytes). Both are bit-exact everywhere.
    run_seed
        Shared by all parties of one run; 0 <= run_seed < 2**64.
    shapes
        Shape of each tuned tensor in tuned order; position ``i`` in keys is ``shapes[i]``.
    """

    kind: PerturbationKind
    run_seed: int
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"kind must be one of {PERTURBATION_KINDS}, got {self.kind!r}")
        if isinstance(self.run_seed, bool) or not isinstance(self.run_seed, int):
            raise ValueError(f"run_seed must be an int, got {type(self.run_seed).__name__}")
        if not 0 <= self.run_seed < 2**64:
            raise ValueError(f"run_seed must be in [0, 2**64), got {self.run_seed}")
        if not self.shapes:
            raise ValueError("shapes is empty: select at least one tensor to tune")
        if len(self.shapes) > MAX_TENSORS:
            raise ValueError(
                f"{len(self.shapes)} tensors exceed the engine limit of {MAX_TENSORS}; tune fewer tensors "
                "(e.g. ParamSelection(mode='pattern', ...))"
            )
        for shape in self.shapes:
            if any(int(s) < 0 for s in shape):
                raise ValueError(f"invalid tensor shape {shape}")
        if max(self.numels) > MAX_NUMEL:
            raise ValueError(f"a tensor of {max(self.numels)} values exceeds the engine limit of {MAX_NUMEL}")

    @cached_property
    def numels(self) -> tuple[int, ...]:
        """Element count of each tuned tensor."""
        return tuple(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes)

    @cached_property
    def _gaussian_key(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
        sequence = np.random.SeedSequence([ENGINE_TAG, self.run_seed, _GAUSSIAN_TAG])
        words = sequence.generate_state(2, np.uint32)
        return round_keys((int(words[0]), int(words[1])))

    def _check(self, seed_index: int, position: int) -> None:
        if not 0 <= seed_index < MAX_SEED_INDEX:
            raise ValueError(f"seed_index must be in [0, {MAX_SEED_INDEX}), got {seed_index}")
        if not 0 <= position < len(self.shapes):
            raise ValueError(f"position must be in [0, {len(self.shapes)}), got {position}")

    def _check_gaussian(self, what: str, seed_index: int, position: int) -> int:
        if self.kind != "gaussian":
            raise ValueError(f"{what} needs kind='gaussian', this perturbation is {self.kind!r}")
        self._check(seed_index, position)
        return self.numels[position]

    def fill_gaussian(
        self, seed_index: int, position: int, out: torch.Tensor, *, start: int = 0, count: int | None = None
    ) -> torch.Tensor:
        """Write values ``[start, start + count)`` of one tensor's Gaussian direction into ``out[:count]``
        (CPU, float32, contiguous) and return that view; ``count`` defaults to the rest of the tensor and
        ``start`` must be a multiple of 8."""
        n = self._check_gaussian("fill_gaussian", seed_index, position)
        count = n - start if count is None else count
        if not 0 <= start <= n or not 0 <= count <= n - start:
            raise ValueError(f"values [{start}, {start + count}) are not inside the tensor's {n}")
        self._check_buffer(out, count)
        piece = out[:count]
        fill_gaussian_(piece.numpy(), self._gaussian_key, position, seed_index, start)
        return piece

    def add_gaussian_(self, seed_index: int, position: int, target: torch.Tensor, alpha: float) -> None:
        """``target += alpha * z`` for one tensor (``target`` its flat CPU float32 view), z never stored."""
        n = self._check_gaussian("add_gaussian_", seed_index, position)
        self._check_buffer(target, n)
        if target.numel() != n:
            raise ValueError(f"target holds {target.numel()} values, the tensor has {n}")
        add_gaussian_(target.numpy(), self._gaussian_key, position, seed_index, alpha)

    def add_gaussian_sum_(
        self,
        position: int,
        seed_indices: npt.NDArray[np.int64],
        values: npt.NDArray[np.float64],
        out: torch.Tensor,
        *,
        start: int = 0,
    ) -> None:
        """``out += sum_s values[s] * z_s[start:start + out.numel()]`` for one tensor (CPU float32), the
        seeds' sum formed piece by piece in cache and added to ``out`` once."""
        seeds = np.asarray(seed_indices)
        n = self._check_gaussian("add_gaussian_sum_", 0, position)
        if seeds.size and (int(seeds.min()) < 0 or int(seeds.max()) >= MAX_SEED_INDEX):
            raise ValueError(f"seed indices must be in [0, {MAX_SEED_INDEX})")
        self._check_buffer(out, 0)
        if start < 0 or start + out.numel() > n:
            raise ValueError(f"values [{start}, {start + out.numel()}) are not inside the tensor's {n}")
        add_gaussian_sum_(out.numpy(), self._gaussian_key, position, seeds, np.asarray(values), start)

    def sign_words(self, seed_index: int, position: int) -> npt.NDArray[np.uint64]:
        """The raw 64-bit generator words of one tensor's Rademacher signs: ceil(numel / 64) of them.

        Value ``i`` is bit ``i % 64`` of word ``i // 64`` (the numbers, whatever the host's byte order).
        """
        if self.kind != "rademacher":
            raise ValueError(f"sign_words needs kind='rademacher', this perturbation is {self.kind!r}")
        self._check(seed_index, position)
        bits = np.random.PCG64(np.random.SeedSequence([ENGINE_TAG, self.run_seed, seed_index, position]))
        words: npt.NDArray[np.uint64] = bits.random_raw((self.numels[position] + 63) // 64)
        return words

    def packed_signs(self, seed_index: int, position: int) -> torch.Tensor:
        """Packed Rademacher signs of one tensor: uint8, ceil(numel / 8) bytes, little bit order."""
        if self.kind != "rademacher":
            raise ValueError(f"packed_signs needs kind='rademacher', this perturbation is {self.kind!r}")
        raw = self.sign_words(seed_index, position).astype("<u8", copy=False)
        return torch.from_numpy(raw.view(np.uint8)[: (self.numels[position] + 7) // 8])

    def materialize(self, seed_index: int, position: int) -> torch.Tensor:
        """A fresh CPU float32 tensor holding one tensor's direction, shaped like the tensor."""
        self._check(seed_index, position)
        n = self.numels[position]
        if self.kind == "gaussian":
            out = self.fill_gaussian(seed_index, position, torch.empty(n, dtype=torch.float32))
        else:
            out = expand_signs(self.packed_signs(seed_index, position), n)
        return out.view(self.shapes[position])

    @staticmethod
    def _check_buffer(out: torch.Tensor, n: int) -> None:
        if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError("directions are generated into a contiguous CPU float32 buffer")
        if out.numel() < n:
            raise ValueError(f"buffer holds {out.numel()} elements, the tensor needs {n}")


_LUTS: dict[torch.device, torch.Tensor] = {}


def sign_lut(device: torch.device) -> torch.Tensor:
    """(256, 8) float32 table mapping a packed byte to its eight +-1 values, cached per device."""
    lut = _LUTS.get(device)
    if lut is None:
        bytes_ = torch.arange(256, dtype=torch.int32).unsqueeze(1)
        bits = (bytes_ >> torch.arange(8, dtype=torch.int32)) & 1
        lut = (bits.to(torch.float32) * 2.0 - 1.0).to(device)
        _LUTS[device] = lut  # a racing duplicate is identical, so no lock is needed
    return lut


def expand_signs(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Unpack ``packed`` (uint8) into a fresh float32 +-1 vector of ``numel`` elements on its device."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() * 8 < numel:
        raise ValueError("packed must be a 1-D uint8 tensor with at least numel / 8 bytes")
    lut = sign_lut(packed.device)
    return lut.index_select(0, packed.to(torch.int32)).view(-1)[:numel]
