"""Gaussian directions generated in pieces equal one ``normal_`` call, in the engine and its kernels."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from torch import nn

import fedtune.zo.directions as directions
from fedtune.zo.directions import SeedDirection
from fedtune.zo.gaussian_chunks import BLOCK, GaussianPieces, piece_bounds
from fedtune.zo.params import TunedParameters
from fedtune.zo.perturbation import Perturbation
from fedtune.zo.replay import replay

# The package re-exports the function ``replay``, which shadows the submodule as an attribute.
replay_module = importlib.import_module("fedtune.zo.replay")

SIZES = [1, 5, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 100, 1000, 4096, 4097, 4111, 4113, 10_000, 196_613]


def _whole(seed: int, n: int) -> torch.Tensor:
    return torch.empty(n).normal_(generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("chunk", [16, 48, 256, 4096])
def test_pieces_equal_one_call(n: int, chunk: int) -> None:
    pieces = GaussianPieces(77, n, chunk)
    out = torch.empty(n)
    scratch = torch.empty(pieces.max_piece)
    for start, stop in pieces.bounds:
        out[start:stop] = pieces.fill(scratch)
    assert torch.equal(out, _whole(77, n))


@pytest.mark.parametrize("n", SIZES)
def test_bounds_cover_the_tensor_and_leave_room_for_the_tail(n: int) -> None:
    bounds = piece_bounds(n, 32)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    if len(bounds) > 1:
        assert all((b - a) % BLOCK == 0 for a, b in bounds[:-1])
        assert bounds[-1][1] - bounds[-1][0] >= 2 * BLOCK


def test_piece_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        piece_bounds(100, 24)
    pieces = GaussianPieces(1, 20, 16)
    pieces.fill(torch.empty(20))
    with pytest.raises(RuntimeError, match="every piece"):
        pieces.fill(torch.empty(20))


class _Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.zeros(5_003))
        self.mid = nn.Parameter(torch.zeros(37, 11))
        self.small = nn.Parameter(torch.zeros(7))


def _tuned(module: nn.Module) -> TunedParameters:
    names, tensors = zip(*module.named_parameters(), strict=True)
    return TunedParameters(tuple(names), tuple(tensors))


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 64 values, so the tiny tensors here span many pieces."""
    monkeypatch.setattr(directions, "PIECE", 64)
    monkeypatch.setattr(replay_module, "CPU_CHUNK", 64)


@pytest.mark.usefixtures("small_pieces")
def test_uncached_passes_apply_the_whole_tensor_direction() -> None:
    module = _Wide()
    tuned = _tuned(module)
    perturbation = Perturbation(kind="gaussian", run_seed=3, shapes=tuned.shapes)
    direction = SeedDirection(tuned, perturbation, cache="never", budget_bytes=0, threads=2)
    direction.reset(11)
    with torch.inference_mode():
        direction.add_(0.5)
    for position, tensor in enumerate(tuned.tensors):
        assert torch.equal(tensor.detach(), 0.5 * perturbation.materialize(11, position))


@pytest.mark.usefixtures("small_pieces")
def test_piecewise_replay_equals_seed_by_seed() -> None:
    module, reference = _Wide(), _Wide()
    tuned = _tuned(module)
    perturbation = Perturbation(kind="gaussian", run_seed=3, shapes=tuned.shapes)
    seeds, values = [2, 5, 40], [0.25, -1.5, 3.0]
    assert replay(tuned, perturbation, (seeds, values), threads=2) == 3
    with torch.inference_mode():
        for position, tensor in enumerate(_tuned(reference).tensors):
            for seed, value in zip(seeds, values, strict=True):
                tensor.add_(perturbation.materialize(seed, position), alpha=value)
    for ours, theirs in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-6)
