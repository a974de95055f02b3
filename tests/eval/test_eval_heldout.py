"""Held-out evaluation: Rouge-L against hand-computed LCS F1, token-weighted loss, the EvalResult fields."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import datasets
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

import fedtune.eval.heldout as heldout_mod
from fedtune.config import RunConfig
from fedtune.data.collate import encode_examples, generate_answers
from fedtune.eval.heldout import HeldoutEvaluator, _first_word, rouge_l
from fedtune.zo.loss import answer_loss, answer_loss_sums

# Answers of very different token lengths, so a token-weighted mean differs from a per-batch mean.
PROMPTS = [
    "Movie review: a joy.\nIs this review positive or negative?",
    "What is your name?",
    "Describe the weather today in a few words.",
    "Movie review: dull and long.\nIs this review positive or negative?",
    "Say hello.",
]
ANSWERS = [
    "positive",
    "My name is a long story that I will not tell you right now",
    "the cat sat on the mat",
    "negative",
    "hello",
]


def _heldout() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})


def _evaluator(tok: PreTrainedTokenizerBase, **kwargs: Any) -> HeldoutEvaluator:
    opts: dict[str, Any] = {"max_length": 64, "num_generations": 4, "max_new_tokens": 3, "batch_size": 2}
    opts.update(kwargs)
    return HeldoutEvaluator(tok, _heldout(), **opts)


# -- rouge_l -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 100.0),
        ("dogs bark loudly", "the cat sat", 0.0),
        # LCS 3: P = 3/3, R = 3/6 -> F = 2 * 1 * 0.5 / 1.5
        ("the cat sat", "the cat sat on the mat", 200.0 / 3.0),
        # LCS "beta gamma" = 2: P = 2/3, R = 2/5 -> F = 2 * (4/15) / (16/15) = 0.5
        ("alpha beta gamma", "beta delta gamma epsilon zeta", 50.0),
        # order matters (LCS, not bag of words): LCS 1 of 2 each way -> F = 0.5
        ("gamma beta", "beta gamma", 50.0),
        # rouge-score lowercases, drops punctuation and stems (use_stemmer=True)
        ("Positive!", "positive", 100.0),
        ("cats running", "cat runs", 100.0),
    ],
)
def test_rouge_l_matches_hand_computed_lcs_f1(prediction: str, reference: str, expected: float) -> None:
    assert rouge_l([prediction], [reference]) == pytest.approx(expected)


def test_rouge_l_is_the_mean_over_pairs_in_percent() -> None:
    preds = ["the cat sat", "same words", "nothing shared"]
    refs = ["the cat sat on the mat", "same words", "completely different"]
    assert rouge_l(preds, refs) == pytest.approx((200.0 / 3.0 + 100.0 + 0.0) / 3.0)


def test_rouge_l_rejects_mismatched_lengths_and_is_nan_when_empty() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_l(["a", "b"], ["a"])
    assert math.isnan(rouge_l([], []))


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("Positive.", "positive"),
        ("  NEGATIVE! it was bad", "negative"),
        ("hello, world", "hello"),
        ("?!", ""),
        ("", ""),
        ("   ", ""),
    ],
)
def test_first_word_lowercases_and_strips_punctuation(text: str, word: str) -> None:
    assert _first_word(text) == word


# -- HeldoutEvaluator ----------------------------------------------------------------------------
def test_evaluator_rejects_an_empty_heldout_split(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    empty = datasets.Dataset.from_dict({"prompt": [], "answer": []})
    with pytest.raises(ValueError, match="held-out split is empty"):
        HeldoutEvaluator(smollm_tokenizer, empty, max_length=64, num_generations=0, max_new_tokens=2)


def test_evaluator_batches_the_split_once(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    ev = _evaluator(smollm_tokenizer, num_generations=3)
    # 5 examples in batches of 2 -> 2 + 2 + 1, each equal to encoding that slice directly
    assert [int(b.input_ids.shape[0]) for b in ev.batches] == [2, 2, 1]
    direct = encode_examples(smollm_tokenizer, PROMPTS[2:4], ANSWERS[2:4], max_length=64)
    assert torch.equal(ev.batches[1].input_ids, direct.input_ids)
    assert torch.equal(ev.batches[1].labels, direct.labels)
    assert ev.gen_prompts == PROMPTS[:3] and ev.gen_refs == ANSWERS[:3]


def test_loss_is_the_token_weighted_mean_over_examples(
    tiny_lm: LlamaForCausalLM, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    ev = _evaluator(smollm_tokenizer)
    # Reference: each example alone (no padding), through HF's own full-logits causal-LM loss,
    # weighted by its number of answer tokens.
    total, tokens, per_batch = 0.0, 0, []
    with torch.inference_mode():
        for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
            one = encode_examples(smollm_tokenizer, [prompt], [answer], max_length=64)
            hf = tiny_lm(input_ids=one.input_ids, attention_mask=one.attention_mask, labels=one.labels).loss
            total += float(hf) * one.num_answer_tokens
            tokens += one.num_answer_tokens
        per_batch = [float(answer_loss(tiny_lm, b)) for b in ev.batches]
    expected = total / tokens
    got = ev.loss(tiny_lm)
    assert got == pytest.approx(expected, rel=1e-5)
    # The check can tell weighting apart: a plain mean of the batch losses is measurably different.
    assert abs(sum(per_batch) / len(per_batch) - expected) > 1e-3
    assert not tiny_lm.training


def test_per_example_and_per_token_loss_differ_as_defined(
    tiny_lm: LlamaForCausalLM, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    # Hand-made: each example's mean loss from HF alone; the two means weigh them differently.
    means, counts = [], []
    with torch.inference_mode():
        for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
            one = encode_examples(smollm_tokenizer, [prompt], [answer], max_length=64)
            hf = tiny_lm(input_ids=one.input_ids, attention_mask=one.attention_mask, labels=one.labels).loss
            means.append(float(hf))
            counts.append(one.num_answer_tokens)
    per_token = sum(m * c for m, c in zip(means, counts, strict=True)) / sum(counts)
    per_example = sum(means) / len(means)
    ev = _evaluator(smollm_tokenizer)
    got_token, got_example = ev.losses(tiny_lm)
    assert got_token == pytest.approx(per_token, rel=1e-5)
    assert got_example == pytest.approx(per_example, rel=1e-5)
    assert abs(per_token - per_example) > 1e-3  # answer lengths 1 to 13 tokens: the means differ
    result = ev(tiny_lm)
    assert result.heldout_loss == pytest.approx(per_token, rel=1e-5)
    assert result.heldout_loss_per_example == pytest.approx(per_example, rel=1e-5)


def test_answer_loss_sums_agree_with_answer_loss(
    tiny_lm: LlamaForCausalLM, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    batch = encode_examples(smollm_tokenizer, PROMPTS, ANSWERS, max_length=64)
    with torch.inference_mode():
        sums, counts = answer_loss_sums(tiny_lm, batch)
        whole = float(answer_loss(tiny_lm, batch))
    assert counts.tolist() == [
        encode_examples(smollm_tokenizer, [p], [a], max_length=64).num_answer_tokens
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]
    assert float(sums.sum()) / int(counts.sum()) == pytest.approx(whole, rel=1e-5)


def test_call_scores_generations_with_rouge_and_first_word_match(
    tiny_lm: LlamaForCausalLM, smollm_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    preds = ["Positive.", "negative", "the cat sat", ""]

    def fake_generate(model: Any, tokenizer: Any, prompts: Sequence[str], **kwargs: Any) -> list[str]:
        calls.append({"prompts": list(prompts), **kwargs})
        return preds

    monkeypatch.setattr(heldout_mod, "generate_answers", fake_generate)
    ev = _evaluator(smollm_tokenizer, num_generations=4, max_new_tokens=5)
    result = ev(tiny_lm)

    assert calls == [
        {"prompts": PROMPTS[:4], "max_new_tokens": 5, "max_length": 64, "batch_size": 2, "template": "chat"}
    ]
    # refs: "positive", "My name is ...", "the cat sat on the mat", "negative"
    # Rouge-L: 100, 0, 66.67 (see above), 0 (empty prediction)
    assert result.rouge_l == pytest.approx((100.0 + 0.0 + 200.0 / 3.0 + 0.0) / 4.0)
    # first words: positive=positive, negative!=my, the=the, ""!=negative
    assert result.exact_match == pytest.approx(0.5)
    assert result.num_generations == 4 and result.num_loss_examples == 5
    assert result.heldout_loss == pytest.approx(ev.loss(tiny_lm), rel=1e-6)
    assert result.generations == tuple(preds)


def test_call_with_real_greedy_generation(
    tiny_lm: LlamaForCausalLM, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    ev = _evaluator(smollm_tokenizer, num_generations=2, max_new_tokens=2)
    result = ev(tiny_lm)
    preds = generate_answers(tiny_lm, smollm_tokenizer, PROMPTS[:2], max_new_tokens=2, max_length=64)
    assert result.rouge_l == pytest.approx(rouge_l(preds, ANSWERS[:2]))
    assert 0.0 <= result.rouge_l <= 100.0 and 0.0 <= result.exact_match <= 1.0
    assert result.num_generations == 2 and math.isfinite(result.heldout_loss)


def test_call_without_generations_reports_nan_quality(
    tiny_lm: LlamaForCausalLM, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    result = _evaluator(smollm_tokenizer, num_generations=0)(tiny_lm)
    assert math.isnan(result.rouge_l) and math.isnan(result.exact_match)
    assert result.num_generations == 0 and result.num_loss_examples == 5
    assert math.isfinite(result.heldout_loss)


def test_for_run_takes_lengths_and_counts_from_the_config(
    smollm_tokenizer: PreTrainedTokenizerBase,
) -> None:
    cfg = RunConfig.from_flat(
        {
            "model.max-length": 48,
            "data.heldout-size": 5,
            "data.eval-generations": 3,
            "data.max-new-tokens": 4,
        }
    )
    ev = HeldoutEvaluator.for_run(smollm_tokenizer, _heldout(), cfg)
    assert (ev.max_length, ev.max_new_tokens, ev.batch_size) == (48, 4, 16)
    zs = HeldoutEvaluator.for_run(smollm_tokenizer, _heldout(), cfg, zeroshot=True)
    assert zs.max_new_tokens == cfg.data.zeroshot_max_new_tokens == 128
    assert ev.gen_prompts == PROMPTS[:3]
    assert len(ev.batches) == 1 and int(ev.batches[0].input_ids.shape[1]) <= 48
