from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from fedtune.data.batch import TokenBatch
from fedtune.zo.loss import answer_loss


class _Opaque(nn.Module):
    """Hides get_decoder so answer_loss must take the full-logits path."""

    def __init__(self, inner: LlamaForCausalLM) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: torch.Tensor) -> object:
        return self.inner(**kwargs)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pad", [0, 3])
def test_answer_loss_matches_hf(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch], tie: bool, pad: int
) -> None:
    model = tiny_model(tie=tie)
    batch = token_batch(seed=1, pad=pad)
    with torch.inference_mode():
        ours = answer_loss(model, batch)
        reference = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
        generic = answer_loss(_Opaque(model), batch)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    assert abs(float(ours) - float(reference)) <= 1e-5
    assert abs(float(generic) - float(reference)) <= 1e-5


def test_uneven_answer_lengths(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch]
) -> None:
    model = tiny_model()
    base = token_batch(seed=2, answer=6)
    labels = base.labels.clone()
    labels[0, :-1] = -100  # row 0 keeps one answer token
    batch = TokenBatch(base.input_ids, base.attention_mask, labels)
    with torch.inference_mode():
        reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        assert abs(float(answer_loss(model, batch)) - float(reference)) <= 1e-5


def test_batch_without_answers_is_rejected(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch]
) -> None:
    batch = token_batch(seed=3)
    empty = TokenBatch(batch.input_ids, batch.attention_mask, torch.full_like(batch.labels, -100))
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_loss(tiny_model(), empty)


def test_per_example_loss_is_each_rows_own_mean(
    tiny_model: Callable[..., LlamaForCausalLM], token_batch: Callable[..., TokenBatch]
) -> None:
    from fedtune.zo.loss import answer_loss_per_example

    model = tiny_model()
    batch = token_batch(seed=4, rows=3)
    with torch.inference_mode():
        per_row = answer_loss_per_example(model, batch)
        for i in range(3):
            one = TokenBatch(
                batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1], batch.labels[i : i + 1]
            )
            torch.testing.assert_close(per_row[i], answer_loss(model, one), rtol=1e-5, atol=1e-6)
