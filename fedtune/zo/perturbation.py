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
* ``"gaussian"``: ``torch.Tensor.normal_`` over the flattened tensor (float32) from a fresh CPU
  ``torch.Generator``. Torch truncates seeds to 32 bits (its mt19937 is seeded with a uint32), so the seed
  is a keyed bijection of ``seed_index * 2**12 + position``: collision-free within a run for
  ``seed_index < 2**20`` and at most ``2**12`` tensors. Values depend on the torch version and may differ in
  the last bit across CPU instruction sets, which :func:`fedtune.zo.fingerprint.z_checksum` detects.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import torch

ENGINE_VERSION = "fedtune-zo/1"
"""Version of the direction layout above; parties with different versions cannot share seeds."""

ENGINE_TAG = 0x46_5A_4F_31  # "FZO1": domain-separates our SeedSequence keys from any other use of run_seed.
_GAUSSIAN_TAG = 1

MAX_SEED_INDEX = 2**20
"""Exclusive upper bound of a seed index (the Gaussian key packs it into 20 bits)."""
MAX_TENSORS = 2**12
"""Most tensors one run may tune (the Gaussian key packs the position into 12 bits)."""

PerturbationKind = Literal["gaussian", "rademacher"]
PERTURBATION_KINDS: tuple[str, ...] = get_args(PerturbationKind)

_MASK32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    """MurmurHash3's finalizer: a bijection on 32-bit integers that scatters neighbouring keys."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def generator_id(kind: str) -> str:
    """Name the random-number backend whose exact stream a kind depends on (compared between parties)."""
    if kind == "rademacher":
        return f"numpy-pcg64-raw/{ENGINE_VERSION}"
    return f"torch-{torch.__version__.split('+')[0]}-mt19937-normal/{ENGINE_VERSION}"


@dataclass(frozen=True)
class Perturbation:
    """The direction generator of one run: kind, run seed and the shapes of the tuned tensors, in order.

    Parameters
    ----------
    kind
        ``"gaussian"`` (N(0, 1), as in MeZO and FedKSeed) or ``"rademacher"`` (uniform +-1; bit-exact
        everywhere and storable as packed bits, d/8 bytes).
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

    @cached_property
    def numels(self) -> tuple[int, ...]:
        """Element count of each tuned tensor."""
        return tuple(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes)

    @cached_property
    def _gaussian_keys(self) -> tuple[int, int]:
        k1, k2 = np.random.SeedSequence([ENGINE_TAG, self.run_seed, _GAUSSIAN_TAG]).generate_state(2)
        return int(k1), int(k2)

    def _check(self, seed_index: int, position: int) -> None:
        if not 0 <= seed_index < MAX_SEED_INDEX:
            raise ValueError(f"seed_index must be in [0, {MAX_SEED_INDEX}), got {seed_index}")
        if not 0 <= position < len(self.shapes):
            raise ValueError(f"position must be in [0, {len(self.shapes)}), got {position}")

    def gaussian_seed(self, seed_index: int, position: int) -> int:
        """The 32-bit torch seed of one tensor's Gaussian direction (injective per run)."""
        self._check(seed_index, position)
        k1, k2 = self._gaussian_keys
        return _fmix32(((seed_index << 12) | position) ^ k1) ^ k2

    def fill_gaussian(self, seed_index: int, position: int, out: torch.Tensor) -> torch.Tensor:
        """Write the Gaussian direction of one tensor into ``out[:numel]`` (CPU, float32, contiguous)."""
        if self.kind != "gaussian":
            raise ValueError(f"fill_gaussian needs kind='gaussian', this perturbation is {self.kind!r}")
        n = self.numels[position] if 0 <= position < len(self.shapes) else 0
        self._check_buffer(out, n)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.gaussian_seed(seed_index, position))
        return out[:n].normal_(generator=generator)

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
