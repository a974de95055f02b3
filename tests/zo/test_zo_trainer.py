from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from fedtune.data.batch import TokenBatch
from fedtune.zo.loss import answer_loss
from fedtune.zo.params import ParamSelection
from fedtune.zo.step import StepResult, ZOConfig
from fedtune.zo.trainer import train_zo

TARGET = 7


def _fixed_answer_batch(seed: int, rows: int = 8) -> TokenBatch:
    """Random prompts that must all be answered with TARGET: learnable by any direction-following method."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (rows, 12), generator=generator)
    ids[:, -1] = TARGET
    labels = torch.full_like(ids, -100)
    labels[:, -1] = TARGET
    return TokenBatch(ids, torch.ones_like(ids), labels)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_held_out_answer_loss_falls(tiny_model: Callable[..., LlamaForCausalLM], kind: str) -> None:
    # One 200-step zeroth-order trajectory is noisy (the held-out drop ranged 0.13-1.2 over 16 run seeds
    # with Gaussian z), so three runs are averaged.
    held_out = _fixed_answer_batch(10_000, rows=64)
    drops: list[float] = []
    for run_seed in range(3):
        model = tiny_model(std=0.02)
        with torch.inference_mode():
            before = float(answer_loss(model, held_out))
        seen: list[int] = []
        results = train_zo(
            model,
            selection=ParamSelection(),
            config=ZOConfig(eps=1e-3, kind=kind, threads=1),  # type: ignore[arg-type]
            batches=_fixed_answer_batch,
            steps=200,
            lr=6e-4,
            run_seed=run_seed,
            eval_fn=lambda step, result, seen=seen: seen.append(step),
        )
        with torch.inference_mode():
            drops.append(before - float(answer_loss(model, held_out)))
        assert len(results) == 200 and seen == list(range(1, 201))
        assert not any(r.skipped for r in results)
    assert sum(drops) / 3 > 0.3, drops  # about 0.4 (gaussian) / 0.8 (rademacher)


def test_seed_pool_and_iterable_batches(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    def run(pool: int | None) -> list[StepResult]:
        return train_zo(
            tiny_model(),
            selection=ParamSelection(mode="no-embeddings"),
            config=ZOConfig(kind="rademacher"),
            batches=iter([_fixed_answer_batch(i) for i in range(6)]),
            steps=6,
            lr=1e-4,
            run_seed=3,
            seed_pool_size=pool,
        )

    pooled = run(4)
    assert all(0 <= r.seed_index < 4 for r in pooled)
    assert [r.seed_index for r in run(4)] == [r.seed_index for r in pooled]
    assert len({r.seed_index for r in run(None)}) == 6
    with pytest.raises(ValueError, match="batches ran out after 6 steps"):
        train_zo(
            tiny_model(),
            selection=ParamSelection(),
            config=ZOConfig(),
            batches=[_fixed_answer_batch(0)] * 6,
            steps=7,
            lr=1e-4,
            run_seed=0,
        )
    with pytest.raises(ValueError, match="seed_pool_size must be in"):
        train_zo(
            tiny_model(),
            selection=ParamSelection(),
            config=ZOConfig(),
            batches=[],
            steps=1,
            lr=1e-4,
            run_seed=0,
            seed_pool_size=0,
        )
