"""The held-out evaluator scores a model where it lives (gpu): inputs follow the model to CUDA."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from fedtune.eval.heldout import HeldoutEvaluator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_model_scores_like_its_cpu_copy(
    tiny_lm: LlamaForCausalLM, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prepare
    heldout = datasets.Dataset.from_dict(
        {"prompt": ["Say yes.", "What is your name?", "Say no."], "answer": ["yes", "Bob", "no"]}
    )
    evaluator = HeldoutEvaluator(
        smollm_tokenizer, heldout, max_length=32, num_generations=3, max_new_tokens=2, batch_size=2
    )
    on_cuda = copy.deepcopy(tiny_lm).to("cuda")
    # Execute
    cpu_result, cuda_result = evaluator(tiny_lm), evaluator(on_cuda)
    # Assert
    assert cuda_result.heldout_loss == pytest.approx(cpu_result.heldout_loss, rel=1e-4)
    assert cuda_result.num_generations == cpu_result.num_generations == 3
    assert next(on_cuda.parameters()).device.type == "cuda"
