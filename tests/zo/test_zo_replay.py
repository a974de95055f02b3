from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from fedtune.zo.directions import SeedDirection
from fedtune.zo.params import ParamSelection, select_parameters
from fedtune.zo.perturbation import Perturbation
from fedtune.zo.replay import nonzero_coefficients, replay


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _coefficients(k: int, nonzero: int) -> np.ndarray:
    draws = np.random.Generator(np.random.PCG64(42))
    dense = np.zeros(k)
    dense[draws.choice(k, nonzero, replace=False)] = draws.normal(0.0, 3e-3, nonzero)
    return dense


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize(("threads", "nonzero"), [(1, 12), (2, 12), (2, 41)])  # 41: groups of 16, 16, 9
def test_replay_equals_stepwise_and_negation_restores(
    tiny_model: Callable[..., LlamaForCausalLM], kind: str, threads: int, nonzero: int
) -> None:
    dense = _coefficients(64, nonzero)
    model, stepwise = tiny_model(), tiny_model()
    tuned = select_parameters(model, ParamSelection())
    perturbation = Perturbation(kind=kind, run_seed=9, shapes=tuned.shapes)  # type: ignore[arg-type]
    original = _weights(model)

    assert replay(tuned, perturbation, dense, threads=threads) == nonzero
    direction = SeedDirection(
        select_parameters(stepwise, ParamSelection()), perturbation, cache="never", budget_bytes=0, threads=1
    )
    with torch.inference_mode():
        for seed in np.flatnonzero(dense):
            direction.reset(int(seed))
            direction.add_(float(dense[seed]))
    assert _rel(_weights(model) - original, _weights(stepwise) - original) < 1e-5
    assert _rel(_weights(model), _weights(stepwise)) < 1e-6
    assert _rel(_weights(model), original) > 1e-4

    replay(tuned, perturbation, -dense, threads=threads)
    assert _rel(_weights(model), original) < 1e-6


def test_sparse_and_dense_forms_agree(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    dense = _coefficients(32, 5)
    seeds = np.flatnonzero(dense)
    a, b = tiny_model(), tiny_model()
    tuned_a, tuned_b = select_parameters(a, ParamSelection()), select_parameters(b, ParamSelection())
    perturbation = Perturbation(kind="rademacher", run_seed=1, shapes=tuned_a.shapes)
    replay(tuned_a, perturbation, dense)
    replay(tuned_b, perturbation, (seeds[::-1].tolist(), dense[seeds][::-1].tolist()))  # order-free input
    assert torch.equal(_weights(a), _weights(b))


def test_zero_coefficients_do_nothing(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    model = tiny_model()
    tuned = select_parameters(model, ParamSelection())
    perturbation = Perturbation(kind="gaussian", run_seed=1, shapes=tuned.shapes)
    before = _weights(model)
    assert replay(tuned, perturbation, np.zeros(16)) == 0
    assert torch.equal(before, _weights(model))


def test_replay_leaves_global_rng_alone(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    tuned = select_parameters(tiny_model(), ParamSelection())
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    for kind in ("gaussian", "rademacher"):
        replay(tuned, Perturbation(kind=kind, run_seed=2, shapes=tuned.shapes), _coefficients(8, 3))  # type: ignore[arg-type]
    assert torch.equal(torch_state, torch.get_rng_state())
    assert all(np.array_equal(x, y) for x, y in zip(np_state, np.random.get_state(), strict=True))


@pytest.mark.parametrize(
    ("coefficients", "message"),
    [
        (np.zeros((2, 2)), "must be 1-D"),
        (np.array([0.0, np.nan]), "must be finite"),
        (([1, 1], [0.1, 0.2]), "duplicates"),
        (([1, 2], [0.1]), "must be equal 1-D"),
        (([-1], [0.1]), "seed indices must be in"),
        (([0.5], [0.1]), "must be integers"),
        (([1], [0.1], [2]), "dense array or as"),
    ],
)
def test_coefficient_validation(coefficients: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nonzero_coefficients(coefficients)  # type: ignore[arg-type]


def test_shape_mismatch_is_rejected(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    tuned = select_parameters(tiny_model(), ParamSelection())
    wrong = Perturbation(kind="gaussian", run_seed=0, shapes=((3,),))
    with pytest.raises(ValueError, match="shapes do not match"):
        replay(tuned, wrong, np.ones(2))
