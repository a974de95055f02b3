"""The two-point zeroth-order step of MeZO, the local update of FedKSeed.

MeZO: Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023
(https://arxiv.org/abs/2305.17333). FedKSeed: Qin et al., "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", ICML 2024 (https://arxiv.org/abs/2312.06353).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedtune.data.batch import TokenBatch
from fedtune.zo.directions import CACHE_MODES, CacheMode, SeedDirection
from fedtune.zo.loss import answer_loss, answer_loss_per_example
from fedtune.zo.params import TunedParameters
from fedtune.zo.perturbation import PERTURBATION_KINDS, Perturbation, PerturbationKind

LossFn = Callable[[nn.Module, TokenBatch], torch.Tensor]
# Per-example two-point scalars (L+_i - L-_i) / (2 eps) -> the one scalar the step releases and uses
# (e.g. DP-ZO's clip-sum-noise-divide); see :meth:`MeZOStep.step`.
ScalarRelease = Callable[[npt.NDArray[np.float64]], float]


@dataclass(frozen=True)
class ZOConfig:
    """Settings of the SPSA estimator and of how its directions are produced.

    Parameters
    ----------
    eps
        Perturbation scale epsilon (MeZO: 1e-3 full-parameter; FedKSeed: 5e-4).
    kind
        Direction distribution: ``"gaussian"`` (the papers) or ``"rademacher"`` (+-1; bit-exact everywhere
        and several times cheaper on CPU).
    cache_z
        ``"auto"`` caches z while caches plus scratch fit ``memory_budget_ratio``; ``"always"`` caches all of
        it (float32 Gaussian z costs 4 bytes per parameter); ``"never"`` regenerates z on each of the three
        passes. Packed Rademacher signs cost d/8 bytes, so ``"auto"`` caches them.
    memory_budget_ratio
        Allowed peak memory relative to inference; the extra (ratio - 1) x model bytes bounds the caches.
    threads
        Worker threads for direction generation and the update passes (torch releases the GIL).
    """

    eps: float = 1e-3
    kind: PerturbationKind = "gaussian"
    cache_z: CacheMode = "auto"
    memory_budget_ratio: float = 1.2
    threads: int = 2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite float (MeZO uses 1e-3), got {self.eps}")
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"kind must be one of {PERTURBATION_KINDS}, got {self.kind!r}")
        if self.cache_z not in CACHE_MODES:
            raise ValueError(f"cache_z must be one of {CACHE_MODES}, got {self.cache_z!r}")
        if not (math.isfinite(self.memory_budget_ratio) and self.memory_budget_ratio >= 1.0):
            raise ValueError(
                f"memory_budget_ratio must be >= 1.0 (peak / inference peak), got {self.memory_budget_ratio}"
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 1 <= self.threads <= 64:
            raise ValueError(f"threads must be an int in [1, 64], got {self.threads!r}")


@dataclass(frozen=True)
class StepResult:
    """Outcome of one step; ``projected_grad`` is 0.0 when ``skipped`` (so sums stay finite)."""

    seed_index: int
    projected_grad: float
    loss_plus: float
    loss_minus: float
    skipped: bool


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each tensor counted once: the inference-memory floor."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


class MeZOStep:
    """In-place two-point SPSA step with three perturbation passes and no copy of the model.

    ``theta += eps z; L+; theta -= 2 eps z; L-; g = (L+ - L-) / (2 eps); theta += (eps - lr g) z``.
    The last pass fuses MeZO's restore and update (``fedkseed.md`` §3). Both losses use the same batch, under
    ``torch.inference_mode`` with the model in eval mode (dropout off). A non-finite loss restores the
    weights, skips the update and is counted in :attr:`skipped`.
    """

    def __init__(
        self,
        model: nn.Module,
        tuned: TunedParameters,
        config: ZOConfig,
        *,
        run_seed: int,
        loss_fn: LossFn = answer_loss,
        per_example_loss_fn: LossFn = answer_loss_per_example,
    ) -> None:
        self.model = model
        self.tuned = tuned
        self.config = config
        self.loss_fn = loss_fn
        self.per_example_loss_fn = per_example_loss_fn
        self.perturbation = Perturbation(kind=config.kind, run_seed=run_seed, shapes=tuned.shapes)
        budget = int((config.memory_budget_ratio - 1.0) * model_bytes(model))
        self.direction = SeedDirection(
            tuned, self.perturbation, cache=config.cache_z, budget_bytes=budget, threads=config.threads
        )
        self.skipped = 0

    def _losses(self, batch: TokenBatch, per_example: bool) -> npt.NDArray[np.float64]:
        fn = self.per_example_loss_fn if per_example else self.loss_fn
        return np.atleast_1d(fn(self.model, batch).float().cpu().numpy().astype(np.float64))

    def step(
        self, batch: TokenBatch, seed_index: int, lr: float, *, release: ScalarRelease | None = None
    ) -> StepResult:
        """Estimate the projected gradient along z(seed_index) and move the weights by ``-lr g z``.

        With ``release``, both passes compute per-example losses and g is ``release`` of the
        per-example scalars (DP-ZO: clipped, summed, noised, divided), so the weights move only
        by what is released; ``loss_plus``/``loss_minus`` are then the per-example means.
        """
        if not math.isfinite(lr):
            raise ValueError(f"lr must be finite, got {lr}")
        eps = self.config.eps
        per_example = release is not None
        self.model.eval()
        device = self.tuned.tensors[0].device
        batch = batch.to(device)
        with torch.inference_mode():
            self.direction.reset(seed_index)
            self.direction.add_(eps)
            plus = self._losses(batch, per_example)
            loss_plus = float(plus.mean())
            if not np.isfinite(plus).all():
                self.direction.add_(-eps)
                return self._skip(seed_index, loss_plus, math.nan)
            self.direction.add_(-2.0 * eps)
            minus = self._losses(batch, per_example)
            loss_minus = float(minus.mean())
            if not np.isfinite(minus).all():
                self.direction.add_(eps)
                return self._skip(seed_index, loss_plus, loss_minus)
            if release is None:
                projected_grad = (loss_plus - loss_minus) / (2.0 * eps)
            else:
                projected_grad = float(release((plus - minus) / (2.0 * eps)))
                if not math.isfinite(projected_grad):
                    self.direction.add_(eps)
                    return self._skip(seed_index, loss_plus, loss_minus)
            self.direction.add_(eps - lr * projected_grad)
        return StepResult(seed_index, projected_grad, loss_plus, loss_minus, skipped=False)

    def _skip(self, seed_index: int, loss_plus: float, loss_minus: float) -> StepResult:
        self.skipped += 1
        return StepResult(seed_index, 0.0, loss_plus, loss_minus, skipped=True)
