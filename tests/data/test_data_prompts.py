"""Prompt templates: the Alpaca text, and the template reaching batches, the evaluator and the cache key."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

import fedtune.eval.heldout as heldout_mod
from fedtune.config import RunConfig
from fedtune.data.collate import IGNORE_INDEX, format_prompt
from fedtune.data.node import NodeData
from fedtune.data.prompts import encode_conversation, encode_prompt

ALPACA_HEAD = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def _ds() -> datasets.Dataset:
    prompts = [encode_prompt("Add the numbers.", "2 and 3"), "Name a colour."]
    return datasets.Dataset.from_dict({"prompt": prompts, "answer": ["5", "Blue"], "label": ["a", "b"]})


def test_alpaca_template_text(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    assert format_prompt(smollm_tokenizer, "Name a colour.", template="alpaca") == (
        f"{ALPACA_HEAD}\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert format_prompt(
        smollm_tokenizer, encode_prompt("Add the numbers.", "2 and 3"), template="alpaca"
    ) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    with pytest.raises(ValueError, match="chat, alpaca"):
        format_prompt(smollm_tokenizer, "x", template="vicuna")


def test_chat_template_renders_an_input_and_every_turn(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    text = format_prompt(smollm_tokenizer, encode_prompt("Add the numbers.", "2 and 3"))
    assert "Add the numbers.\n\n2 and 3" in text and "fedtune-prompt" not in text
    convo = encode_conversation([("user", "Capital of France?"), ("assistant", "Paris."), ("user", "Italy?")])
    text = format_prompt(smollm_tokenizer, convo)
    assert text.count("<|im_start|>assistant") == 2 and "Paris." in text and text.endswith("assistant\n")


def test_config_validates_the_template() -> None:
    assert RunConfig().data.prompt_template == "chat"
    with pytest.raises(ValueError, match=r"data\.prompt_template"):
        RunConfig.from_flat({"data.prompt-template": "vicuna"})


def test_alpaca_template_reaches_the_training_batches(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    batch = NodeData(_ds()).batches(
        smollm_tokenizer, batch_size=2, max_length=128, key=(0,), template="alpaca"
    )(0)
    for row, labels in zip(batch.input_ids, batch.labels, strict=True):
        prompt = row[labels == IGNORE_INDEX]
        assert "### Instruction:" in smollm_tokenizer.decode(prompt)
        assert "<|im_start|>" not in smollm_tokenizer.decode(row)


def test_alpaca_template_reaches_the_evaluator(
    smollm_tokenizer: PreTrainedTokenizerBase, tiny_lm: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RunConfig.from_flat(
        {"data.prompt-template": "alpaca", "data.eval-generations": 2, "data.heldout-size": 2}
    )
    ev = heldout_mod.HeldoutEvaluator.for_run(smollm_tokenizer, _ds(), cfg)
    assert "### Input:\n2 and 3" in smollm_tokenizer.decode(ev.batches[0].input_ids[0])
    seen: dict[str, object] = {}

    def fake_generate(*args: object, **kwargs: object) -> list[str]:
        seen.update(kwargs)
        return ["5", "Blue"]

    monkeypatch.setattr(heldout_mod, "generate_answers", fake_generate)
    ev(tiny_lm)
    assert seen["template"] == "alpaca"


def test_the_template_is_part_of_the_token_cache_key(
    smollm_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    node = NodeData(_ds(), token_dir=tmp_path, source_key="src")
    chat = node.tokenized(smollm_tokenizer)
    alpaca = node.tokenized(smollm_tokenizer, template="alpaca")
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 2
    assert chat.prompt(0) != alpaca.prompt(0)
    again = NodeData(_ds(), token_dir=tmp_path, source_key="src").tokenized(
        smollm_tokenizer, template="alpaca"
    )
    assert again.prompt(0) == alpaca.prompt(0)
