"""Prompts with structure, carried as one string, and the templates that render them.

A task's ``prompt`` column is one string everywhere (partitions, node data files, the token
cache, generations). A prompt that is more than an instruction (an Alpaca ``input``, a Dolly
``context``, the earlier turns of a conversation) is stored as a tagged JSON object, so each
template can place the parts where it wants them: the chat template renders the turns, the
Alpaca template puts the input under ``### Input:``. Plain prompts stay plain text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_INPUT",
    "PROMPT_TEMPLATES",
    "Prompt",
    "alpaca_text",
    "chat_messages",
    "decode_prompt",
    "encode_conversation",
    "encode_prompt",
    "prompt_text",
]

PROMPT_TEMPLATES = ("chat", "alpaca")
# Stanford Alpaca's templates, the ones the FedKSeed reference code formats its data with.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_TAG = "fedtune-prompt"


@dataclass(frozen=True)
class Prompt:
    """An instruction with an optional input, or a conversation ending with a user turn."""

    instruction: str = ""
    input: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content); set for conversations only


def encode_prompt(instruction: str, input: str = "") -> str:
    """The ``prompt`` string of an instruction and its (possibly empty) input."""
    if not input.strip():
        return instruction
    return json.dumps({_TAG: {"instruction": instruction, "input": input}}, ensure_ascii=False)


def encode_conversation(messages: Sequence[tuple[str, str]]) -> str:
    """The ``prompt`` string of the turns before an answer; one user turn alone stays plain text."""
    if not messages or messages[-1][0] != "user":
        raise ValueError("a conversation prompt must end with a user turn")
    if len(messages) == 1:
        return messages[0][1]
    return json.dumps({_TAG: {"messages": [list(m) for m in messages]}}, ensure_ascii=False)


def decode_prompt(text: str) -> Prompt:
    """The parts of a ``prompt`` string (plain text is an instruction alone)."""
    if text.startswith('{"' + _TAG + '":'):
        try:
            body = json.loads(text)[_TAG]
            if "messages" in body:
                return Prompt(messages=tuple((str(r), str(c)) for r, c in body["messages"]))
            return Prompt(instruction=str(body["instruction"]), input=str(body["input"]))
        except (ValueError, KeyError, TypeError):
            pass  # a plain prompt that happens to look like one: take it as text
    return Prompt(instruction=text)


def _transcript(messages: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"{role}: {content}" for role, content in messages)


def prompt_text(text: str) -> str:
    """A readable rendering of a ``prompt`` string (no template): for logs and generations files."""
    p = decode_prompt(text)
    if p.messages:
        return _transcript(p.messages)
    return f"{p.instruction}\n\n{p.input}" if p.input else p.instruction


def chat_messages(text: str) -> list[dict[str, str]]:
    """The chat-template messages of a ``prompt`` string: its turns, or one user turn."""
    p = decode_prompt(text)
    if p.messages:
        return [{"role": r, "content": c} for r, c in p.messages]
    return [{"role": "user", "content": prompt_text(text)}]


def alpaca_text(text: str) -> str:
    """The Alpaca-template prompt; a conversation's last user turn is the instruction, the earlier
    turns (as ``role: content`` lines) its input."""
    p = decode_prompt(text)
    instruction, input_ = p.instruction, p.input
    if p.messages:
        instruction, input_ = p.messages[-1][1], _transcript(p.messages[:-1])
    if input_:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_)
    return ALPACA_PROMPT.format(instruction=instruction)
