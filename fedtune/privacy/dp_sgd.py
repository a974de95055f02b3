"""DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) through opacus 1.6.

Each step: Poisson-sample the examples at rate q, compute every example's gradient (opacus'
``GradSampleHooks`` on the trainable layers, e.g. peft's ``lora_A``/``lora_B`` ``nn.Linear``s),
clip each to L2 norm C (opacus' flat clipping in ``DPOptimizer.clip_and_accumulate``), add
N(0, (sigma C)^2) to the sum and divide by the expected batch size q*N. Each step is then a
sampled Gaussian mechanism, which :mod:`fedtune.privacy.accountant` accounts for.

Generic: a module, its trainable parameters and a per-example loss. What is hand-written, and why:

* the noise: opacus draws it from a ``torch.Generator`` (or torchcsprng in ``secure_mode``, which no
  longer builds with current torch), so :class:`SecureDPOptimizer` overrides ``add_noise`` to draw
  from :class:`~fedtune.privacy.noise.SecureGaussian`;
* Poisson sampling: opacus' ``DPDataLoader`` samples from a torch generator and needs a
  ``DataLoader``; :func:`poisson_sample` draws the secret mask from the same CSPRNG (the server
  knows the run's seeds, so a seeded sample would void the amplification by subsampling);
* an empty Poisson batch: opacus' loader feeds the model an empty batch, which a causal LM cannot
  take; here the step sets empty per-sample gradients so opacus clips nothing and still adds noise.

Per-sample gradients use ``loss_reduction="sum"`` in the hooks (the loss is the sum of per-example
losses, so ``grad_sample[i]`` is exactly example i's gradient, whatever the drawn batch size) and
``loss_reduction="mean"`` with ``expected_batch_size`` in the optimizer (opacus then divides the
noised sum by the expected, not the drawn, batch size, as Poisson sampling requires).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedtune.privacy.noise import SecureGaussian

BatchT = TypeVar("BatchT")


@dataclass(frozen=True)
class DPSGDSettings:
    """noise_multiplier sigma > 0, clip C > 0, expected_batch_size q*N >= 1 (the mean's divisor)."""

    noise_multiplier: float
    clip: float
    expected_batch_size: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"DP-SGD noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"DP-SGD clip must be > 0, got {self.clip}")
        if isinstance(self.expected_batch_size, bool) or self.expected_batch_size < 1:
            raise ValueError(
                f"DP-SGD expected_batch_size must be an int >= 1 (q times the example count), "
                f"got {self.expected_batch_size!r}"
            )


@dataclass(frozen=True)
class PrivateSteps:
    """What :func:`train_dp_sgd` did: one loss per non-empty step (mean per-example loss), the steps
    taken (every step, empty ones included, released noise), how many were empty, examples drawn."""

    losses: tuple[float, ...]
    steps: int
    empty_steps: int
    examples: int


class SecureDPOptimizer(DPOptimizer):  # type: ignore[misc]  # opacus ships no type hints
    """opacus' ``DPOptimizer`` whose Gaussian noise comes from :class:`SecureGaussian`.

    Everything else (flat per-sample clipping, scaling by the expected batch size, the wrapped
    optimizer's step) is opacus'. ``add_noise`` mirrors opacus 1.6's, with the draw replaced.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        noise: SecureGaussian | None = None,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
        )
        self.noise = noise if noise is not None else SecureGaussian()

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self.noise.normal_like(p.summed_grad, std)).view_as(p)
            _mark_as_processed(p.summed_grad)


def poisson_sample(num_examples: int, sample_rate: float, rng: SecureGaussian) -> npt.NDArray[np.int64]:
    """Indices of a Poisson sample: each of ``num_examples`` kept independently with probability q.

    The mask comes from the CSPRNG: the amplification by subsampling assumes nobody else knows which
    examples were drawn. The result may be empty (the step must still add noise and count).
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return np.flatnonzero(rng.uniform(num_examples) < sample_rate).astype(np.int64)


def _hooked_params(module: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
    """opacus computes per-sample gradients for every trainable parameter of ``module``; the
    optimizer must hold exactly those, or some gradient would escape clipping."""
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    given = {id(p) for p in params}
    if trainable != given:
        raise ValueError(
            f"the module has {len(trainable)} trainable parameters but {len(given)} were given "
            f"({len(trainable & given)} shared); pass exactly the module's requires_grad parameters"
        )


def train_dp_sgd(
    module: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    *,
    optimizer: torch.optim.Optimizer,
    per_example_loss: Callable[[BatchT], torch.Tensor],
    batch_for_step: Callable[[int], BatchT | None],
    steps: int,
    settings: DPSGDSettings,
    noise: SecureGaussian | None = None,
) -> PrivateSteps:
    """``steps`` DP-SGD steps of ``optimizer`` (over ``params``) on ``module``.

    per_example_loss(batch) -> float tensor (n,): each example's own loss (no batch mixing, or the
    per-sample gradients are wrong). batch_for_step(t) -> a batch, or None for an empty Poisson
    sample. The hooks are removed afterwards, so a process-cached module is left as it was.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters to train privately")
    _hooked_params(module, params)
    hooks = GradSampleHooks(module, batch_first=True, loss_reduction="sum", strict=True)
    dp_opt = SecureDPOptimizer(
        optimizer,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.clip,
        expected_batch_size=settings.expected_batch_size,
        noise=noise,
    )
    losses: list[float] = []
    empty = examples = 0
    try:
        for t in range(steps):
            dp_opt.zero_grad(set_to_none=True)
            batch = batch_for_step(t)
            if batch is None:
                empty += 1
                for p in params:  # no example: opacus clips an empty set and adds noise only
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
            else:
                per_example = per_example_loss(batch)
                if per_example.dim() != 1 or per_example.numel() == 0:
                    raise ValueError(
                        "per_example_loss must return a non-empty (n,) tensor, "
                        f"got {tuple(per_example.shape)}"
                    )
                with warnings.catch_warnings():
                    # The first hooked layer's input (frozen embeddings) needs no gradient; torch warns
                    # that the full backward hook then fires on outputs only, which is what opacus needs.
                    warnings.filterwarnings(
                        "ignore", message="Full backward hook is firing", category=UserWarning
                    )
                    per_example.sum().backward()  # type: ignore[no-untyped-call]
                losses.append(float(per_example.detach().mean()))
                examples += per_example.numel()
            dp_opt.step()
    finally:
        dp_opt.zero_grad(set_to_none=True)
        hooks.cleanup()
        for p in params:
            if hasattr(p, "summed_grad"):
                delattr(p, "summed_grad")
    return PrivateSteps(losses=tuple(losses), steps=steps, empty_steps=empty, examples=examples)
