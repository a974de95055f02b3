"""Training batches mask everything but the answer; prompts are left-padded for generation."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fedtune.data.collate import (
    IGNORE_INDEX,
    PromptBatch,
    encode_examples,
    encode_prompts,
    format_prompt,
    generate_answers,
)

PROMPTS = ["Movie review: A three-hour cinema master class.\nPositive or negative?", "Hi"]
ANSWERS = ["positive", "Hello there, how can I help you today?"]


def _prompt_len(tok: PreTrainedTokenizerBase, prompt: str) -> int:
    return len(tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"])


def test_labels_mask_exactly_prompt_and_padding(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    # Execute
    batch = encode_examples(smollm_tokenizer, PROMPTS, ANSWERS, max_length=128)
    # Assert
    eos = smollm_tokenizer.eos_token_id
    for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS, strict=True)):
        n_prompt = _prompt_len(smollm_tokenizer, prompt)
        n_total = int(batch.attention_mask[i].sum())
        assert (
            batch.attention_mask[i, :n_total].all() and not batch.attention_mask[i, n_total:].any()
        )  # right pad
        assert (batch.labels[i, :n_prompt] == IGNORE_INDEX).all()
        assert (batch.labels[i, n_total:] == IGNORE_INDEX).all()
        answer_labels = batch.labels[i, n_prompt:n_total]
        assert (answer_labels != IGNORE_INDEX).all()
        assert torch.equal(answer_labels, batch.input_ids[i, n_prompt:n_total])  # not pre-shifted
        assert int(answer_labels[-1]) == eos
        assert smollm_tokenizer.decode(answer_labels) == answer + smollm_tokenizer.eos_token
        assert (batch.input_ids[i, n_total:] == smollm_tokenizer.pad_token_id).all()
    assert batch.num_answer_tokens == int((batch.labels != IGNORE_INDEX).sum())
    assert batch.input_ids.shape[1] == max(int(m.sum()) for m in batch.attention_mask)  # no excess padding


def test_prompt_uses_the_chat_template(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    batch = encode_examples(smollm_tokenizer, ["What is 2+2?"], ["4"], max_length=64)
    text = str(smollm_tokenizer.decode(batch.input_ids[0]))
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>")
    assert text.count("<|im_start|>") == 3  # system, user, assistant: no doubled BOS


def test_long_prompt_is_cut_from_the_left(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    long_prompt = "word " * 200 + "END OF PROMPT"
    batch = encode_examples(smollm_tokenizer, [long_prompt], ["positive"], max_length=24)
    assert batch.input_ids.shape == (1, 24)
    answer = batch.labels[0][batch.labels[0] != IGNORE_INDEX]
    assert smollm_tokenizer.decode(answer) == "positive<|im_end|>"
    assert "assistant" in smollm_tokenizer.decode(batch.input_ids[0])  # the prompt's tail survives


def test_a_long_answer_is_truncated_with_a_logged_count(
    smollm_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    long = "a long answer " * 20
    with caplog.at_level(logging.WARNING, logger="fedtune.data.collate"):
        batch = encode_examples(smollm_tokenizer, ["q", "p"], [long, "ok"], max_length=10)
    assert batch.input_ids.shape == (2, 10)
    row = batch.labels[0]
    assert bool((row != IGNORE_INDEX).all())  # the prompt is dropped: every position is answer
    want = [*smollm_tokenizer(long, add_special_tokens=False)["input_ids"][:9], smollm_tokenizer.eos_token_id]
    assert row.tolist() == want
    assert "1 of 2 answers are longer than model.max-length=10" in caplog.text


def test_encode_examples_validates(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="one answer per prompt"):
        encode_examples(smollm_tokenizer, ["a", "b"], ["x"], max_length=32)
    with pytest.raises(ValueError, match="empty"):
        encode_examples(smollm_tokenizer, [], [], max_length=32)
    with pytest.raises(TypeError, match="not one string"):
        encode_prompts(smollm_tokenizer, "a prompt", max_length=32)


def test_plain_format_without_chat_template(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    # Prepare: a copy of the tokenizer without its template.
    import copy

    plain = copy.deepcopy(smollm_tokenizer)
    plain.chat_template = None
    # Execute
    batch = encode_examples(plain, ["Question?"], ["Answer."], max_length=32)
    # Assert
    assert format_prompt(plain, "Question?") == "Question?\n"
    assert plain.decode(batch.input_ids[0]) == "Question?\nAnswer.<|im_end|>"


def test_prompts_are_left_padded(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    pb = encode_prompts(smollm_tokenizer, PROMPTS, max_length=64)
    lengths = [_prompt_len(smollm_tokenizer, p) for p in PROMPTS]
    assert pb.input_ids.shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    pad = max(lengths) - min(lengths)
    assert not pb.attention_mask[short, :pad].any() and pb.attention_mask[short, pad:].all()
    assert (pb.input_ids[short, :pad] == smollm_tokenizer.pad_token_id).all()
    assert smollm_tokenizer.decode(pb.input_ids[short, pad:]) == format_prompt(
        smollm_tokenizer, PROMPTS[short]
    )
    assert encode_prompts(smollm_tokenizer, PROMPTS, max_length=8).input_ids.shape == (2, 8)


def test_prompt_batch_validates_shapes() -> None:
    with pytest.raises(ValueError, match="2-D"):
        PromptBatch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_generation_is_greedy_and_batch_invariant(
    smollm_2layer: PreTrainedModel, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    # Execute: the same prompts one by one and batched (left padding must not change answers).
    kw = {"max_new_tokens": 6, "max_length": 64}
    batched = generate_answers(smollm_2layer, smollm_tokenizer, PROMPTS, batch_size=2, **kw)
    single = [generate_answers(smollm_2layer, smollm_tokenizer, [p], **kw)[0] for p in PROMPTS]
    # Assert
    assert batched == single
    assert len(batched) == 2 and all(isinstance(a, str) and a == a.strip() and a for a in batched)
    assert generate_answers(smollm_2layer, smollm_tokenizer, [], **kw) == []


def test_generation_restores_training_mode(
    tiny_lm: LlamaForCausalLM, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    tiny_lm.train()
    [answer] = generate_answers(tiny_lm, smollm_tokenizer, ["Hi"], max_new_tokens=3, max_length=32)
    assert tiny_lm.training
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(tiny_lm, smollm_tokenizer, ["Hi"], max_new_tokens=0, max_length=32)


def test_two_layer_slice_trains_on_answer_tokens(
    smollm_2layer: PreTrainedModel, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    batch = encode_examples(smollm_tokenizer, PROMPTS, ANSWERS, max_length=64)
    with torch.inference_mode():
        out = smollm_2layer(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
