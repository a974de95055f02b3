"""A node's examples as split-learning batches: token ids, mask, targets and the CTI class.

Classification reads the task's ``prompt`` as the text and its ``answer`` as the class name;
causal LM uses the project's answer-only collation (prompt tokens carry label -100). The
contributing-token statistics need a class per example: the class itself for classification,
the task's ``label`` column (sentiment, category) for causal LM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data.collate import encode_examples
from fedtune.data.prompts import prompt_text
from fedtune.data.sampler import BatchSampler


@dataclass(frozen=True)
class SplitBatch:
    """``targets``: B class ids (classification) or B x S label ids (causal LM); ``groups``: B CTI classes."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    groups: torch.Tensor


class SplitExamples:
    """Encodes one dataset for the split (the same code on clients, in evaluation, in benchmarks)."""

    def __init__(
        self,
        examples: datasets.Dataset,
        tokenizer: PreTrainedTokenizerBase,
        *,
        task: str,
        class_names: Sequence[str],
        max_length: int,
        template: str = "chat",
    ) -> None:
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.template = template  # data.prompt-template, for causal LM
        # A classifier reads the text itself: structured prompts (Alpaca/Dolly/chat rows) as readable text.
        raw = [str(p) for p in examples["prompt"]]
        self.prompts = [prompt_text(p) for p in raw] if task == "classification" else raw
        self.answers = [str(a) for a in examples["answer"]]
        if task == "classification":
            index = {c: i for i, c in enumerate(class_names)}
            unknown = sorted({a for a in self.answers if a not in index})
            if unknown:
                raise ValueError(
                    f"answers {unknown[:5]} are not among the classes {list(class_names)}; "
                    "set algorithm.options.classes to every class name"
                )
            self.groups = [index[a] for a in self.answers]
            self.num_groups = len(class_names)
        else:
            labels = (
                [str(v) for v in examples["label"]] if "label" in examples.column_names else [""] * len(self)
            )
            names = sorted(set(labels))
            self.groups = [names.index(v) for v in labels]
            self.num_groups = max(2, len(names))

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, idx: Sequence[int]) -> SplitBatch:
        groups = torch.tensor([self.groups[i] for i in idx], dtype=torch.long)
        if self.task == "classification":
            enc = self.tokenizer(
                [self.prompts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            return SplitBatch(enc["input_ids"], enc["attention_mask"], groups.clone(), groups)
        tb = encode_examples(
            self.tokenizer,
            [self.prompts[i] for i in idx],
            [self.answers[i] for i in idx],
            max_length=self.max_length,
            template=self.template,
        )
        return SplitBatch(tb.input_ids, tb.attention_mask, tb.labels, groups)

    def stream(
        self, batch_size: int, key: Sequence[int], *, balanced: bool = False
    ) -> Callable[[], SplitBatch]:
        """An endless, keyed stream of shuffled batches (capped at the node's size); ``balanced``
        draws round-robin over the CTI classes (``data.sampling = "class-balanced"``)."""
        labels = [str(g) for g in self.groups] if balanced else None
        sampler = BatchSampler(
            num_examples=len(self), batch_size=min(batch_size, len(self)), key=key, labels=labels
        )
        return lambda: self.batch(sampler.next_indices())

    def chunks(self, batch_size: int) -> list[SplitBatch]:
        """Every example once, in order (evaluation)."""
        return [self.batch(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]

    def token_ids(self) -> list[list[int]]:
        """Every example's non-pad token ids (for fitting CTI), one batch at a time."""
        out: list[list[int]] = []
        for b in self.chunks(256):
            for ids, mask in zip(b.input_ids, b.attention_mask, strict=True):
                out.append(ids[mask.bool()].tolist())
        return out
