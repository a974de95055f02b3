"""LoRA-FedAvg models on model.device: the cached model sits there, and (gpu) a CUDA model starts from the
CPU's adapter, trains and is evaluated on the GPU."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import pytest
import torch

from fedtune.data.collate import encode_examples
from fedtune.eval.heldout import HeldoutEvaluator
from fedtune.lora.algorithm import get_lora_model, initial_adapter
from fedtune.lora.fedit import adapter_arrays, train_local

# peft asks transformers for a deprecated attribute on every wrap; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _fresh(fresh_models: None) -> Iterator[None]:
    yield


def test_cpu_lora_model_lives_on_the_cpu(run_cfg: Any) -> None:
    model, _ = get_lora_model(run_cfg(**{"model.device": "cpu"}))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_lora_model_starts_like_the_cpu_one_trains_and_evaluates(run_cfg: Any) -> None:
    # Prepare
    cpu_cfg, cuda_cfg = (run_cfg(**{"model.device": d}) for d in ("cpu", "cuda"))
    model, tok = get_lora_model(cuda_cfg)
    cpu_model, _ = get_lora_model(cpu_cfg)
    batch = encode_examples(tok, ["Say yes.", "Say no."], ["yes", "no"], max_length=32)
    heldout = datasets.Dataset.from_dict({"prompt": ["Say yes.", "Say no."], "answer": ["yes", "no"]})
    evaluator = HeldoutEvaluator(tok, heldout, max_length=32, num_generations=2, max_new_tokens=2)
    # Assert: fp32 on the GPU, the same keyed starting adapter as on the CPU, the same held-out loss.
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    start, cpu_start = initial_adapter(cuda_cfg), initial_adapter(cpu_cfg)
    assert list(start) == list(cpu_start)
    assert all(np.array_equal(start[k], cpu_start[k]) for k in start)
    base, cpu_base = model.get_base_model(), cpu_model.get_base_model()
    assert evaluator.loss(base) == pytest.approx(evaluator.loss(cpu_base), rel=1e-4)  # type: ignore[arg-type]
    assert evaluator(base).num_generations == 2  # type: ignore[arg-type]
    # Execute: local AdamW steps on the GPU (the batch moves there by itself).
    result = train_local(model, batch_for_step=lambda _: batch, steps=2, lr=1e-2, key=(0, 1, 0))
    # Assert
    assert math.isfinite(result.train_loss)
    moved = adapter_arrays(model)
    assert any(not np.array_equal(moved[k], start[k]) for k in start)
