from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from fedtune.data.batch import TokenBatch
from fedtune.zo.loss import answer_loss
from fedtune.zo.params import ParamSelection, select_parameters
from fedtune.zo.step import MeZOStep, ZOConfig, model_bytes


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize(("cache_z", "threads"), [("auto", 2), ("always", 1), ("never", 2), ("never", 1)])
def test_fused_step_equals_four_pass_reference(
    tiny_model: Callable[..., LlamaForCausalLM],
    token_batch: Callable[..., TokenBatch],
    kind: str,
    cache_z: str,
    threads: int,
) -> None:
    eps, lr, seed = 1e-3, 1e-2, 17
    batch = token_batch(seed=5)
    model, reference = tiny_model(), tiny_model()
    config = ZOConfig(eps=eps, kind=kind, cache_z=cache_z, threads=threads)  # type: ignore[arg-type]
    stepper = MeZOStep(model, select_parameters(model, ParamSelection()), config, run_seed=3)
    result = stepper.step(batch, seed, lr)

    ref_tuned = select_parameters(reference, ParamSelection())
    zs = [stepper.perturbation.materialize(seed, p) for p in range(len(ref_tuned.tensors))]
    with torch.inference_mode():
        for t, z in zip(ref_tuned.tensors, zs, strict=True):
            t.add_(z, alpha=eps)
        loss_plus = float(answer_loss(reference, batch))
        for t, z in zip(ref_tuned.tensors, zs, strict=True):
            t.add_(z, alpha=-2 * eps)
        loss_minus = float(answer_loss(reference, batch))
        for t, z in zip(ref_tuned.tensors, zs, strict=True):
            t.add_(z, alpha=eps)
        grad = (loss_plus - loss_minus) / (2 * eps)
        for t, z in zip(ref_tuned.tensors, zs, strict=True):
            t.add_(z, alpha=-lr * grad)

    assert not result.skipped and result.seed_index == seed
    assert result.loss_plus == pytest.approx(loss_plus, rel=1e-6)
    assert result.loss_minus == pytest.approx(loss_minus, rel=1e-6)
    assert result.projected_grad == pytest.approx(grad, rel=1e-4, abs=1e-3)
    assert grad != 0.0
    assert _rel(_weights(model), _weights(reference)) < 1e-6
    assert _rel(_weights(model), _weights(tiny_model())) > 1e-5  # the step moved the weights


@pytest.mark.parametrize("bad_pass", [0, 1])
def test_non_finite_loss_is_skipped_and_restores(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch], bad_pass: int
) -> None:
    model = tiny_model()
    before = _weights(model)
    calls: list[int] = []

    def flaky(m: nn.Module, b: TokenBatch) -> torch.Tensor:
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) - 1 == bad_pass else answer_loss(m, b)

    stepper = MeZOStep(
        model, select_parameters(model, ParamSelection()), ZOConfig(), run_seed=0, loss_fn=flaky
    )
    result = stepper.step(token_batch(seed=1), 4, 1e-2)
    assert result.skipped and result.projected_grad == 0.0 and stepper.skipped == 1
    assert len(calls) == bad_pass + 1
    assert _rel(_weights(model), before) < 1e-7
    assert not stepper.step(token_batch(seed=1), 5, 1e-2).skipped and stepper.skipped == 1


def test_step_leaves_global_rng_alone(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch]
) -> None:
    model = tiny_model()
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    for kind in ("gaussian", "rademacher"):
        config = ZOConfig(kind=kind)  # type: ignore[arg-type]
        MeZOStep(model, select_parameters(model, ParamSelection()), config, run_seed=1).step(
            token_batch(seed=0), 2, 1e-3
        )
    assert torch.equal(torch_state, torch.get_rng_state())
    assert all(np.array_equal(a, b) for a, b in zip(np_state, np.random.get_state(), strict=True))


def test_auto_cache_respects_the_memory_budget(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    model = tiny_model()
    tuned = select_parameters(model, ParamSelection())
    budget = 0.2 * model_bytes(model)

    def plan(kind: str, cache_z: str, ratio: float = 1.2) -> MeZOStep:
        config = ZOConfig(kind=kind, cache_z=cache_z, memory_budget_ratio=ratio)  # type: ignore[arg-type]
        return MeZOStep(model, tuned, config, run_seed=0)

    signs = plan("rademacher", "auto")
    assert len(signs.direction.cached) == len(tuned.names) and signs.direction.extra_bytes <= budget
    partial = plan("gaussian", "auto")
    assert 0 < len(partial.direction.cached) < len(tuned.names)
    assert partial.direction.extra_bytes <= budget
    assert len(plan("gaussian", "auto", ratio=3.0).direction.cached) == len(tuned.names)
    assert len(plan("gaussian", "always").direction.cached) == len(tuned.names)
    assert not plan("rademacher", "never").direction.cached


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": 0.0}, "eps must be a positive"),
        ({"eps": float("nan")}, "eps must be a positive"),
        ({"kind": "normal"}, "kind must be one of"),
        ({"cache_z": "sometimes"}, "cache_z must be one of"),
        ({"memory_budget_ratio": 0.9}, "memory_budget_ratio must be >= 1.0"),
        ({"threads": 0}, "threads must be an int"),
    ],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ZOConfig(**kwargs)  # type: ignore[arg-type]


def test_step_input_errors(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch]
) -> None:
    model = tiny_model()
    stepper = MeZOStep(model, select_parameters(model, ParamSelection()), ZOConfig(), run_seed=0)
    with pytest.raises(ValueError, match="lr must be finite"):
        stepper.step(token_batch(seed=0), 1, float("inf"))
    with pytest.raises(ValueError, match="seed_index must be in"):
        stepper.step(token_batch(seed=0), -1, 1e-3)


def test_worker_threads_can_update_inference_tensors(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch]
) -> None:
    model = tiny_model()
    with torch.inference_mode():  # e.g. weights replaced by an earlier replay or reference step
        for param in model.parameters():
            param.data = param.data + 0.0
    stepper = MeZOStep(
        model, select_parameters(model, ParamSelection()), ZOConfig(threads=2, cache_z="never"), run_seed=0
    )
    assert not stepper.step(token_batch(seed=0), 1, 1e-3).skipped


def test_release_sees_per_example_scalars_and_moves_weights_by_what_it_returns(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch]
) -> None:
    eps, lr, seed = 1e-3, 1e-2, 11
    batch = token_batch(seed=2)
    seen: list[np.ndarray] = []

    def release(scalars: np.ndarray) -> float:
        seen.append(scalars.copy())
        return 0.25  # a value no batch statistic would give: the update must use it

    model, reference = tiny_model(), tiny_model()
    config = ZOConfig(eps=eps, kind="rademacher")
    stepper = MeZOStep(model, select_parameters(model, ParamSelection()), config, run_seed=3)
    result = stepper.step(batch, seed, lr, release=release)
    assert result.projected_grad == 0.25 and not result.skipped
    assert seen[0].shape == (batch.input_ids.shape[0],)
    # the per-example scalars are the two-point differences of each row's own mean loss
    ref_stepper = MeZOStep(reference, select_parameters(reference, ParamSelection()), config, run_seed=3)
    ref_stepper.direction.reset(seed)
    with torch.inference_mode():
        ref_stepper.direction.add_(eps)
        plus = ref_stepper.per_example_loss_fn(reference, batch).double().numpy()
        ref_stepper.direction.add_(-2 * eps)
        minus = ref_stepper.per_example_loss_fn(reference, batch).double().numpy()
        ref_stepper.direction.add_(eps - lr * 0.25)
    np.testing.assert_allclose(seen[0], (plus - minus) / (2 * eps), rtol=1e-4, atol=1e-6)
    assert _rel(_weights(model), _weights(reference)) < 1e-6


def test_non_finite_release_skips_and_restores(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch]
) -> None:
    model = tiny_model()
    before = _weights(model)
    stepper = MeZOStep(model, select_parameters(model, ParamSelection()), ZOConfig(), run_seed=3)
    result = stepper.step(token_batch(seed=2), 3, 1e-2, release=lambda s: float("nan"))
    assert result.skipped and result.projected_grad == 0.0
    assert _rel(_weights(model), before) < 1e-6
