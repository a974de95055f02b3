"""The instruction-data layouts a local task file may use, read into (prompt, answer, label, group).

Conversations (``messages``) become one example each: the turns before the last assistant turn
are the prompt (rendered with the chat template when formatted) and that turn is the answer, so
the loss covers assistant text only. Earlier assistant turns are context, not trained on: the
simplest design that keeps every cached example one (prompt, answer) pair.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedtune.data.prompts import decode_prompt, encode_conversation, encode_prompt

__all__ = ["FORMATS", "Rows", "read_rows"]

log = logging.getLogger(__name__)

Rows = tuple[list[str], list[str], list[str], list[str]]  # prompt, answer, label, group

# (name, columns that identify it), in the order they are tried.
FORMATS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prompt/answer", ("prompt", "answer")),
    ("chat messages", ("messages",)),
    ("Alpaca", ("instruction", "input", "output")),
    ("Dolly", ("instruction", "context", "response")),
    ("instruction/response", ("instruction", "response")),
)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _conversation(messages: object) -> tuple[str, str]:
    """(prompt, answer) of one conversation; ("", "") when it has no assistant turn to learn."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return "", ""
    turns: list[tuple[str, str]] = []
    for m in messages:
        if not isinstance(m, Mapping):
            return "", ""
        turns.append((_text(m.get("role")), _text(m.get("content"))))
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    if last < 1 or turns[last - 1][0] != "user":
        return "", ""
    return encode_conversation(turns[:last]), turns[last][1]


def read_rows(columns: Mapping[str, Sequence[Any]], n: int, *, source: str) -> Rows:
    """The task rows of a loaded file's ``columns``; empty or whitespace-only rows are dropped
    (with a logged count), and a file with no usable row is a ValueError."""
    cols = set(columns)
    name = next((fmt for fmt, need in FORMATS if set(need) <= cols), None)

    def column(key: str) -> list[str]:
        return [_text(v) for v in columns[key]] if key in cols else [""] * n

    prompts: list[str]
    answers: list[str]
    if name is None:
        accepted = "; ".join(f"{fmt} ({', '.join(need)})" for fmt, need in FORMATS)
        raise ValueError(
            f"{source}: no instruction format matches the columns {sorted(cols)}; a task file needs one "
            f"of: {accepted}. Optional label and group columns are kept (Dolly's category becomes both)"
        )
    if name == "chat messages":
        pairs = [_conversation(m) for m in columns["messages"]]
        prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    elif name in ("Alpaca", "Dolly"):
        extra = column("input" if name == "Alpaca" else "context")
        prompts = [encode_prompt(i, x) for i, x in zip(column("instruction"), extra, strict=True)]
        answers = column("output" if name == "Alpaca" else "response")
    else:
        prompt_col, answer_col = (
            ("prompt", "answer") if name == "prompt/answer" else ("instruction", "response")
        )
        prompts, answers = column(prompt_col), column(answer_col)
    fallback: Callable[[str], list[str]] = lambda key: column(key) if key in cols else column("category")  # noqa: E731
    labels, groups = fallback("label"), fallback("group")
    keep = [i for i in range(n) if answers[i].strip() and _has_text(prompts[i])]
    if not keep:
        raise ValueError(
            f"{source}: none of its {n} {name} rows has both a non-empty prompt and answer; "
            "there is nothing to train on"
        )
    if len(keep) < n:
        log.warning(
            "%s: dropped %d of %d %s rows with an empty prompt or answer", source, n - len(keep), n, name
        )
    return (
        [prompts[i] for i in keep],
        [answers[i] for i in keep],
        [labels[i] for i in keep],
        [groups[i] for i in keep],
    )


def _has_text(prompt: str) -> bool:
    p = decode_prompt(prompt)
    return bool(p.messages[-1][1].strip()) if p.messages else bool(p.instruction.strip())
