"""Directions on CUDA tensors equal the CPU ones: z itself, a step's three passes and a replay (gpu).

Every direction is drawn on the CPU and copied, so a GPU party regenerates exactly what a CPU party does:
packed Rademacher signs are bit-exact even after ``theta += alpha * z`` (alpha * +-1 is exact, so the one
rounding is the same add on both devices); Gaussian values are copied bit for bit, and updates agree to
float32 rounding (1e-6).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from fedtune.zo.directions import SeedDirection
from fedtune.zo.params import ParamSelection, TunedParameters, select_parameters
from fedtune.zo.perturbation import Perturbation
from fedtune.zo.replay import replay

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
KINDS = ["gaussian", "rademacher"]


def _pair(tiny_model: Callable[..., LlamaForCausalLM]) -> tuple[TunedParameters, TunedParameters]:
    """The tuned tensors of a tiny CPU model and of its CUDA copy (same weights, same order)."""
    cpu_model = tiny_model(seed=3)
    cuda_model = copy.deepcopy(cpu_model).to("cuda")
    cpu, cuda = (select_parameters(m, ParamSelection()) for m in (cpu_model, cuda_model))
    assert cpu.names == cuda.names and {t.device.type for t in cuda.tensors} == {"cuda"}
    return cpu, cuda


def _assert_same(cpu: TunedParameters, cuda: TunedParameters, kind: str) -> None:
    for name, a, b in zip(cpu.names, cpu.tensors, cuda.tensors, strict=True):
        b_cpu = b.detach().cpu()
        if kind == "rademacher":
            assert torch.equal(a.detach(), b_cpu), name
        else:
            torch.testing.assert_close(
                b_cpu, a.detach(), rtol=1e-6, atol=1e-6 * float(a.abs().max()), msg=name
            )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", ["never", "always"])
def test_z_on_cuda_equals_z_on_cpu(kind: str, cache: str) -> None:
    # Prepare: zero tensors, so theta += 1 * z leaves exactly z.
    pert = Perturbation(kind=kind, run_seed=11, shapes=((300, 129), (129,), (7, 3, 5)))  # type: ignore[arg-type]
    names = tuple(f"t{i}" for i in range(len(pert.shapes)))
    on = {
        dev: TunedParameters(
            names,
            tuple(torch.nn.Parameter(torch.zeros(s, device=dev), requires_grad=False) for s in pert.shapes),
        )
        for dev in ("cpu", "cuda")
    }
    for seed in (0, 9, 4095):
        for tuned in on.values():
            direction = SeedDirection(tuned, pert, cache=cache, budget_bytes=0, threads=2)  # type: ignore[arg-type]
            with torch.no_grad():
                for t in tuned.tensors:
                    t.zero_()
            direction.reset(seed)
            direction.add_(1.0)
        # Execute / Assert: the CUDA values are the engine's CPU values.
        for position, (a, b) in enumerate(zip(on["cpu"].tensors, on["cuda"].tensors, strict=True)):
            expected = pert.materialize(seed, position)
            assert torch.equal(a.detach(), expected)
            if kind == "rademacher":
                assert torch.equal(b.detach().cpu(), expected)
            else:
                torch.testing.assert_close(b.detach().cpu(), expected, rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_steps_three_passes_agree_on_cuda_weights(
    tiny_model: Callable[..., LlamaForCausalLM], kind: str
) -> None:
    # Prepare
    cpu, cuda = _pair(tiny_model)
    pert = Perturbation(kind=kind, run_seed=5, shapes=cpu.shapes)  # type: ignore[arg-type]
    directions = [SeedDirection(t, pert, cache="auto", budget_bytes=1 << 30, threads=2) for t in (cpu, cuda)]
    # Execute: MeZO's passes (+eps, -2 eps, eps - lr g) for a few seeds.
    for seed in (1, 17, 300):
        for direction in directions:
            direction.reset(seed)
            for alpha in (1e-3, -2e-3, 1e-3 - 1e-2 * 0.37):
                direction.add_(alpha)
    # Assert
    _assert_same(cpu, cuda, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_replay_agrees_on_cuda_weights(tiny_model: Callable[..., LlamaForCausalLM], kind: str) -> None:
    # Prepare: K = 256 with 40 non-zero lr-folded coefficients.
    cpu, cuda = _pair(tiny_model)
    pert = Perturbation(kind=kind, run_seed=5, shapes=cpu.shapes)  # type: ignore[arg-type]
    rng = np.random.default_rng(np.random.SeedSequence([5, 256]))
    dense = np.zeros(256)
    dense[rng.choice(256, size=40, replace=False)] = rng.normal(0.0, 1e-3, size=40)
    # Execute
    applied = [replay(t, pert, dense, threads=2) for t in (cpu, cuda)]
    # Assert
    assert applied == [40, 40]
    _assert_same(cpu, cuda, kind)
