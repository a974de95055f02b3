"""A node's examples tokenized once and kept on disk.

In a deployment every round runs in a fresh process. Tokenizing a node's examples costs a load of
its task file through ``datasets``, plus a tokenizer pass, and both would be paid every round. The
ids go to ``tokens-<key>.npz`` instead. The key digests the data source and the tokenizer (name,
vocabulary size, special ids, chat template), so a changed file or tokenizer never reuses stale
ids. Writes are atomic. A file that does not load, or holds another format or key, is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
TOKENS_FORMAT = "fedtune-node-tokens/1"

IntArray = npt.NDArray[np.int64]


def _ragged(rows: Sequence[Sequence[int]]) -> tuple[IntArray, IntArray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> str:
    """What decides the ids: the tokenizer's identity, vocabulary, special tokens and chat template."""
    parts = [
        type(tokenizer).__name__,
        str(getattr(tokenizer, "name_or_path", "")),
        str(len(tokenizer)),
        str(tokenizer.eos_token_id),
        str(tokenizer.pad_token_id),
        str(tokenizer.bos_token_id),
        hashlib.sha256(str(getattr(tokenizer, "chat_template", None)).encode()).hexdigest(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class TokenizedExamples:
    """Prompt and answer ids of every example (ragged, flat + offsets) and the labels, if any."""

    prompt_flat: IntArray
    prompt_offsets: IntArray
    answer_flat: IntArray
    answer_offsets: IntArray
    labels: tuple[str, ...] | None

    @staticmethod
    def build(
        prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]], labels: Sequence[str] | None
    ) -> TokenizedExamples:
        if len(prompt_ids) != len(answer_ids) or (labels is not None and len(labels) != len(prompt_ids)):
            raise ValueError("need one prompt, one answer (and one label, if any) per example")
        pf, po = _ragged(prompt_ids)
        af, ao = _ragged(answer_ids)
        return TokenizedExamples(pf, po, af, ao, None if labels is None else tuple(str(v) for v in labels))

    def __len__(self) -> int:
        return len(self.prompt_offsets) - 1

    def prompt(self, i: int) -> list[int]:
        ids: list[int] = self.prompt_flat[self.prompt_offsets[i] : self.prompt_offsets[i + 1]].tolist()
        return ids

    def answer(self, i: int) -> list[int]:
        ids: list[int] = self.answer_flat[self.answer_offsets[i] : self.answer_offsets[i + 1]].tolist()
        return ids

    def save(self, path: Path, key: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        labels = np.asarray(self.labels if self.labels is not None else [], dtype=np.str_)
        try:
            np.savez(
                tmp,
                format=np.asarray(TOKENS_FORMAT),
                key=np.asarray(key),
                prompt_flat=self.prompt_flat,
                prompt_offsets=self.prompt_offsets,
                answer_flat=self.answer_flat,
                answer_offsets=self.answer_offsets,
                labels=labels,
                has_labels=np.asarray(self.labels is not None),
            )
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def load(path: Path, key: str) -> TokenizedExamples | None:
        """The cached ids, or None when the file is missing, unreadable or for another key."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["format"]) != TOKENS_FORMAT or str(f["key"]) != key:
                    return None
                out = TokenizedExamples(
                    f["prompt_flat"].astype(np.int64),
                    f["prompt_offsets"].astype(np.int64),
                    f["answer_flat"].astype(np.int64),
                    f["answer_offsets"].astype(np.int64),
                    tuple(str(v) for v in f["labels"]) if bool(f["has_labels"]) else None,
                )
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            log.warning("ignoring token cache %s (%s); tokenizing again", path, exc)
            return None
        n = len(out)
        consistent = (
            n >= 1
            and len(out.answer_offsets) == n + 1
            and int(out.prompt_offsets[-1]) == out.prompt_flat.size
            and int(out.answer_offsets[-1]) == out.answer_flat.size
            and bool(np.all(np.diff(out.prompt_offsets) >= 0))
            and bool(np.all(np.diff(out.answer_offsets) >= 0))
            and (out.labels is None or len(out.labels) == n)
        )
        if not consistent:
            log.warning("ignoring token cache %s (inconsistent arrays); tokenizing again", path)
            return None
        return out
