"""Turn (prompt, answer) text into tensors: right-padded training batches, left-padded prompts.

Prompt and answer are tokenized separately, exactly as generation sees them (the model continues
after the formatted prompt), so the trained answer tokens are the ones greedy decoding produces.
``template`` (``data.prompt-template``) picks how a prompt is formatted: ``chat`` (the model's
chat template) or ``alpaca`` (:mod:`fedtune.data.prompts`); training and evaluation pass the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.data.batch import TokenBatch
from fedtune.data.prompts import PROMPT_TEMPLATES, alpaca_text, chat_messages, prompt_text

__all__ = [
    "IGNORE_INDEX",
    "PromptBatch",
    "assemble_batch",
    "encode_examples",
    "encode_prompts",
    "format_prompt",
    "generate_answers",
    "tokenize_pairs",
]

IGNORE_INDEX = -100  # HF causal-LM convention: positions the loss skips
log = logging.getLogger(__name__)


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def _check_template(template: str) -> None:
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template must be one of {', '.join(PROMPT_TEMPLATES)}; got {template!r}")


def _uses_chat_template(tokenizer: PreTrainedTokenizerBase, template: str) -> bool:
    return template == "chat" and _has_chat_template(tokenizer)


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, *, template: str = "chat") -> str:
    """The text the model sees before its answer.

    ``chat``: the chat template when the tokenizer has one (a conversation's turns as they are),
    else the plain prompt and a newline. ``alpaca``: the Stanford Alpaca template.
    """
    _check_template(template)
    if template == "alpaca":
        return alpaca_text(prompt)
    if _has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            chat_messages(prompt), add_generation_prompt=True, tokenize=False
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text
    return f"{prompt_text(prompt)}\n"


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], template: str) -> list[list[int]]:
    texts = [format_prompt(tokenizer, p, template=template) for p in prompts]
    # A chat template already spells out its special tokens; plain prompts get the tokenizer's BOS.
    special = not _uses_chat_template(tokenizer, template)
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=special)["input_ids"]
    return ids


def _special_id(tokenizer: PreTrainedTokenizerBase, which: str) -> int:
    value = getattr(tokenizer, f"{which}_token_id", None)
    if not isinstance(value, int):
        raise ValueError(
            f"The tokenizer has no {which} token; set tokenizer.{which}_token (see load_tokenizer)"
        )
    return value


def _check_batch_args(prompts: Sequence[str], max_length: int) -> None:
    if len(prompts) == 0:
        raise ValueError("Cannot encode an empty batch of prompts")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1; got {max_length}")


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_length: int,
    template: str = "chat",
) -> TokenBatch:
    """Tokenize (prompt, answer + EOS) pairs into a right-padded :class:`TokenBatch`.

    Labels are -100 on prompt and padding, so the loss covers only the answer (and the EOS that
    teaches the model to stop). Over-long examples lose prompt tokens from the left: the answer
    is the training signal and must survive; an answer alone longer than ``max_length`` keeps
    its first ``max_length - 1`` tokens and EOS (see :func:`assemble_batch`).
    """
    _check_batch_args(prompts, max_length)
    if isinstance(answers, str) or len(answers) != len(prompts):
        raise ValueError(f"Need one answer per prompt; got {len(prompts)} prompts and {len(answers)} answers")
    prompt_ids, answer_ids = tokenize_pairs(tokenizer, prompts, answers, template=template)
    return assemble_batch(tokenizer, prompt_ids, answer_ids, max_length=max_length)


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    template: str = "chat",
) -> tuple[list[list[int]], list[list[int]]]:
    """The token ids of formatted prompts and of answers (no EOS yet): what a node caches on disk."""
    _check_template(template)
    answer_ids: list[list[int]] = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return _prompt_ids(tokenizer, prompts, template), answer_ids


def assemble_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    *,
    max_length: int,
    log_truncated: bool = True,
) -> TokenBatch:
    """Right-padded batch from :func:`tokenize_pairs` ids: EOS appended, prompts cut from the left.

    An answer that does not fit with its EOS keeps its first ``max_length - 1`` tokens plus EOS
    and loses its whole prompt, as the reference code truncates: one long answer must not fail a
    client's round. The count is logged per batch unless ``log_truncated`` is False (a caller
    that logs it once per node, :meth:`fedtune.data.node.NodeData.batches`).
    """
    if not prompt_ids or len(prompt_ids) != len(answer_ids):
        raise ValueError(
            f"Need one answer per prompt; got {len(prompt_ids)} prompts and {len(answer_ids)} answers"
        )
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1; got {max_length}")
    eos_id = _special_id(tokenizer, "eos")
    pad_id = _special_id(tokenizer, "pad")
    rows: list[tuple[list[int], list[int]]] = []
    truncated = 0
    for p_ids, a in zip(prompt_ids, answer_ids, strict=True):
        if len(a) >= max_length:
            truncated += 1
            rows.append(([], [*a[: max_length - 1], eos_id]))
            continue
        a_ids = [*a, eos_id]
        keep = max_length - len(a_ids)
        rows.append((list(p_ids[len(p_ids) - keep :] if keep < len(p_ids) else p_ids), a_ids))
    if truncated and log_truncated:
        log.warning(
            "%d of %d answers are longer than model.max-length=%d tokens with EOS; kept their first %d "
            "tokens and EOS, without the prompt (raise model.max-length to keep them whole)",
            truncated,
            len(rows),
            max_length,
            max_length - 1,
        )

    length = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (p_ids, a_ids) in enumerate(rows):
        n_p, n = len(p_ids), len(p_ids) + len(a_ids)
        input_ids[i, :n] = torch.tensor(p_ids + a_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, n_p:n] = torch.tensor(a_ids, dtype=torch.long)
    return TokenBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded formatted prompts, ready for ``model.generate`` (new tokens append on the right)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.attention_mask.shape or self.input_ids.dim() != 2:
            raise ValueError(
                "input_ids and attention_mask must share one 2-D shape; got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device))


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, max_length: int, template: str = "chat"
) -> PromptBatch:
    """Tokenize formatted prompts, left-padded; over-long prompts keep their last ``max_length`` tokens."""
    _check_batch_args(prompts, max_length)
    _check_template(template)
    pad_id = _special_id(tokenizer, "pad")
    ids = [p[-max_length:] for p in _prompt_ids(tokenizer, prompts, template)]
    length = max(len(p) for p in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, p in enumerate(ids):
        if p:
            input_ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, length - len(p) :] = 1
    return PromptBatch(input_ids=input_ids, attention_mask=attention_mask)


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_length: int,
    batch_size: int = 16,
    template: str = "chat",
) -> list[str]:
    """Greedy answers, one per prompt, decoded without special tokens and stripped.

    The model is put in eval mode for the call and its previous mode restored afterwards.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1; got {max_new_tokens}, {batch_size}")
    if len(prompts) == 0:
        return []
    _check_batch_args(prompts, max_length)
    device = next(model.parameters()).device
    pad_id, eos_id = _special_id(tokenizer, "pad"), _special_id(tokenizer, "eos")
    # nn.Module.__getattr__ hides generate()'s real signature from mypy.
    generate = cast("Callable[..., torch.Tensor]", model.generate)
    was_training = model.training
    model.train(False)
    answers: list[str] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                batch = encode_prompts(
                    tokenizer, prompts[start : start + batch_size], max_length=max_length, template=template
                )
                batch = batch.to(device)
                out = generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                )
                new_tokens = out[:, batch.input_ids.shape[1] :]
                answers.extend(
                    s.strip() for s in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                )
    finally:
        model.train(was_training)
    return answers
