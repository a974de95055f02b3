"""FedIT LoRA unit behaviour: which parameters train, keyed init, array round trips, local AdamW steps.

The Flower round trip lives in tests/flower/test_flower_lora.py; these tests stay below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from fedtune.assets.models import tiny_causal_lm
from fedtune.config import LoRASection
from fedtune.data.batch import TokenBatch
from fedtune.data.collate import encode_examples
from fedtune.lora.fedit import (
    DEFAULT_TARGETS,
    adapter_arrays,
    add_lora,
    load_adapter_arrays,
    train_local,
)
from fedtune.zo.loss import answer_loss

RANK = 4
CFG = LoRASection(rank=RANK, alpha=8)
NUM_LAYERS, HIDDEN = 2, 64  # the tiny_lm fixture

# peft asks transformers for a deprecated attribute on every wrap; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture
def batch(smollm_tokenizer: PreTrainedTokenizerBase) -> TokenBatch:
    return encode_examples(
        smollm_tokenizer,
        ["Movie review: a joy.\nPositive or negative?", "Movie review: a bore.\nPositive or negative?"],
        ["positive", "negative"],
        max_length=48,
    )


def _fresh(tok: PreTrainedTokenizerBase, *, seed: int, dropout: float = 0.0) -> PeftModel:
    cfg = LoRASection(rank=RANK, alpha=8, dropout=dropout)
    return add_lora(tiny_causal_lm(vocab_size=len(tok), seed=0), cfg, seed=seed)


def _base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_add_lora_makes_only_adapter_matrices_trainable(tiny_lm: LlamaForCausalLM) -> None:
    model = add_lora(tiny_lm, CFG, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # one lora_A and one lora_B per target projection per layer
    assert len(trainable) == NUM_LAYERS * len(DEFAULT_TARGETS) * 2
    assert all(("lora_A" in n or "lora_B" in n) for n in trainable)
    for layer in range(NUM_LAYERS):
        for target in DEFAULT_TARGETS:
            assert any(f"layers.{layer}.self_attn.{target}.lora_A" in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("mlp" in n for n in frozen)


def test_add_lora_starts_as_the_base_model_with_bounded_keyed_a(
    smollm_tokenizer: PreTrainedTokenizerBase, batch: TokenBatch
) -> None:
    base = tiny_causal_lm(vocab_size=len(smollm_tokenizer), seed=0)
    with torch.inference_mode():
        before = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.clone()
    model = add_lora(base, CFG, seed=7)
    with torch.inference_mode():
        after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # lora_B = 0, so the wrapped model computes exactly what the base model did
    assert torch.equal(before, after)
    bound = 1.0 / math.sqrt(HIDDEN)  # kaiming-uniform bound on fan_in
    for name, value in adapter_arrays(model).items():
        if "lora_B" in name:
            assert value.shape == (HIDDEN, RANK) and not value.any()
        else:
            assert value.shape == (RANK, HIDDEN)
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.5 * bound


def test_same_seed_gives_identical_adapters_and_another_seed_does_not(
    smollm_tokenizer: PreTrainedTokenizerBase,
) -> None:
    a, b, c = (adapter_arrays(_fresh(smollm_tokenizer, seed=s)) for s in (3, 3, 4))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[n], c[n]) for n in a if "lora_A" in n)


def test_adapter_arrays_are_float32_copies_and_round_trip(
    smollm_tokenizer: PreTrainedTokenizerBase, batch: TokenBatch
) -> None:
    model = _fresh(smollm_tokenizer, seed=0)
    arrays = adapter_arrays(model)
    assert all(v.dtype == np.float32 for v in arrays.values())
    name = next(n for n in sorted(arrays) if "lora_B" in n)
    arrays[name][:] = 1.0  # a copy: the model is untouched
    assert not adapter_arrays(model)[name].any()

    gen = np.random.default_rng(0)
    new = {n: gen.standard_normal(v.shape).astype(np.float32) * 0.1 for n, v in arrays.items()}
    with torch.inference_mode():
        before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.clone()
    load_adapter_arrays(model, new)
    got = adapter_arrays(model)
    for n in new:
        np.testing.assert_array_equal(got[n], new[n])
    with torch.inference_mode():
        after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(before, after)  # nonzero B now changes the output


def test_load_adapter_arrays_accepts_float64_as_float32(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    model = _fresh(smollm_tokenizer, seed=0)
    # typed float32, but wider arrays (e.g. from an aggregator) are accepted and narrowed
    wide: dict[str, Any] = {
        n: np.full(v.shape, 0.25, dtype=np.float64) for n, v in adapter_arrays(model).items()
    }
    load_adapter_arrays(model, wide)
    assert all(v.dtype == np.float32 and np.all(v == 0.25) for v in adapter_arrays(model).values())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.pop(sorted(a)[0]), "missing"),
        (lambda a: a.update(extra=np.zeros(1, np.float32)), r"unknown \['extra'\]"),
        (lambda a: a.update({sorted(a)[0]: np.zeros((RANK + 1, HIDDEN), np.float32)}), "shape"),
    ],
    ids=["missing", "unknown", "shape"],
)
def test_load_adapter_arrays_rejects_mismatches(
    smollm_tokenizer: PreTrainedTokenizerBase,
    edit: Callable[[dict[str, np.ndarray]], object],
    message: str,
) -> None:
    model = _fresh(smollm_tokenizer, seed=0)
    arrays: dict[str, np.ndarray] = dict(adapter_arrays(model))
    edit(arrays)
    before = adapter_arrays(model)
    arrays = {n: v + 1.0 if n in before else v for n, v in arrays.items()}  # would change every kept array
    with pytest.raises(ValueError, match=message):
        load_adapter_arrays(model, arrays)
    for name, value in adapter_arrays(model).items():  # a rejected set changes nothing, not even a part
        np.testing.assert_array_equal(value, before[name])


def test_train_local_lowers_the_loss_and_leaves_base_weights_alone(
    smollm_tokenizer: PreTrainedTokenizerBase, batch: TokenBatch
) -> None:
    model = _fresh(smollm_tokenizer, seed=0)
    base_before = _base_weights(model)
    with torch.inference_mode():
        loss_before = float(answer_loss(model.get_base_model(), batch))
    asked: list[int] = []

    def batch_for_step(t: int) -> TokenBatch:
        asked.append(t)
        return batch

    result = train_local(model, batch_for_step=batch_for_step, steps=8, lr=3e-2, key=(0, 1, 0))
    with torch.inference_mode():
        loss_after = float(answer_loss(model.get_base_model(), batch))

    assert asked == list(range(8)) and result.steps == 8
    assert loss_after < loss_before - 0.3  # 10.63 -> 9.90: a repeated batch is easy to fit
    # train_loss is the mean of the per-step losses: step 0 sees the untouched model
    assert loss_after < result.train_loss < loss_before
    assert not model.training
    for name, value in _base_weights(model).items():
        assert torch.equal(value, base_before[name]), name
    assert any(v.any() for n, v in adapter_arrays(model).items() if "lora_B" in n)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_train_local_is_reproducible(
    smollm_tokenizer: PreTrainedTokenizerBase, batch: TokenBatch, dropout: float
) -> None:
    # With dropout the masks come from the key, not from torch's global RNG (the autouse fixture
    # fails this test if the global state moves); another key draws other masks.
    runs = []
    for key in [(5, 1, 0), (5, 1, 0), (5, 1, 1)]:
        model = _fresh(smollm_tokenizer, seed=5, dropout=dropout)
        res = train_local(model, batch_for_step=lambda t: batch, steps=3, lr=1e-2, key=key)
        runs.append((res.train_loss, adapter_arrays(model)))
    (loss_a, arr_a), (loss_b, arr_b), (loss_c, arr_c) = runs
    assert loss_a == loss_b
    for name in arr_a:
        np.testing.assert_array_equal(arr_a[name], arr_b[name])
    differs = loss_c != loss_a or any(not np.array_equal(arr_a[n], arr_c[n]) for n in arr_a)
    assert differs == (dropout > 0)  # without dropout the key has nothing to draw


def test_train_local_rejects_zero_steps_and_untrainable_models(
    smollm_tokenizer: PreTrainedTokenizerBase, batch: TokenBatch
) -> None:
    with pytest.raises(ValueError, match=r"raise lora\.local_steps"):
        train_local(
            _fresh(smollm_tokenizer, seed=0), batch_for_step=lambda t: batch, steps=0, lr=1e-2, key=(0,)
        )
    frozen = _fresh(smollm_tokenizer, seed=0)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_local(frozen, batch_for_step=lambda t: batch, steps=1, lr=1e-2, key=(0,))
