"""One node's own training data and its minibatch stream: the client glue every algorithm uses.

A node holds only its examples (``prompt``, ``answer``, ``label``); the stream tokenizes each
batch on demand with the same collation the evaluator uses. Batches are plain shuffled passes
(the FedKSeed paper's sampling) unless ``class-balanced`` is asked for explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.data.sampler import BatchSampler

if TYPE_CHECKING:  # a node's process imports these when it first builds batches, not at start
    import datasets
    from transformers import PreTrainedTokenizerBase

    from fedtune.data.batch import TokenBatch

REQUIRED_COLUMNS = ("prompt", "answer")
SAMPLING_MODES = ("shuffle", "class-balanced")


@dataclass(frozen=True)
class NodeData:
    """A node's private examples. ``sampling``: ``shuffle`` or ``class-balanced``."""

    examples: datasets.Dataset
    sampling: str = "shuffle"

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in self.examples.column_names]
        if missing:
            raise ValueError(
                f"node data lacks column(s) {missing} (has {self.examples.column_names}); "
                "a node's data needs prompt and answer columns"
            )
        if len(self.examples) == 0:
            raise ValueError("node data is empty; give this node at least one example")
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.sampling == "class-balanced" and "label" not in self.examples.column_names:
            raise ValueError("class-balanced sampling needs a label column; use sampling = 'shuffle'")

    def __len__(self) -> int:
        return len(self.examples)

    def batches(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int,
        max_length: int,
        key: Sequence[int],
    ) -> Callable[[int], TokenBatch]:
        """``step -> TokenBatch``: an endless, reproducible stream keyed by ``key``.

        ``key`` is (run seed, round, partition id, ...), so every node and round draws its own
        order and a rerun draws the same one. Batches are capped at the node's size.
        """
        from fedtune.data.collate import encode_examples

        prompts, answers = list(self.examples["prompt"]), list(self.examples["answer"])
        labels = [str(v) for v in self.examples["label"]] if self.sampling == "class-balanced" else None
        sampler = BatchSampler(
            num_examples=len(prompts), batch_size=min(batch_size, len(prompts)), key=key, labels=labels
        )

        def batch_for_step(_step: int) -> TokenBatch:
            idx = sampler.next_indices()
            return encode_examples(
                tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx], max_length=max_length
            )

        return batch_for_step
