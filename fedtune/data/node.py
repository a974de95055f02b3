"""One node's own training data and its minibatch stream: the client glue every algorithm uses.

A node holds only its examples (``prompt``, ``answer``, ``label``). Batches are plain shuffled
passes (the FedKSeed paper's sampling) unless ``class-balanced`` is asked for explicitly, and they
are assembled from ids tokenized once per tokenizer with the evaluator's collation.

Given a ``token_dir`` and a ``source_key`` (what the examples are made from), the ids are kept on
disk (:mod:`fedtune.data.tokens`), keyed also by the prompt template (``data.prompt-template``),
so a template change never reuses ids formatted with another. The examples themselves may then
come from a ``loader`` that runs only when the ids are not cached. So a fresh process per round
(a deployment) neither imports ``datasets`` nor re-reads its task file once the first round has
written the cache.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedtune.data.sampler import BatchSampler
from fedtune.data.tokens import TokenizedExamples, tokenizer_key

if TYPE_CHECKING:  # a node's process imports these when it first builds batches, not at start
    import datasets
    from transformers import PreTrainedTokenizerBase

    from fedtune.data.batch import TokenBatch

log = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("prompt", "answer")
SAMPLING_MODES = ("shuffle", "class-balanced")


class NodeData:
    """A node's private examples. ``sampling``: ``shuffle`` or ``class-balanced``.

    ``examples``: the rows, or a zero-argument loader that builds them on first use. With
    ``token_dir`` and ``source_key`` the tokenized ids are cached there, keyed by both.
    ``template``: how prompts are formatted (``data.prompt-template``); the runtime sets it from
    the run config, so every algorithm's batches follow it without passing it along.
    """

    def __init__(
        self,
        examples: datasets.Dataset | Callable[[], datasets.Dataset],
        sampling: str = "shuffle",
        *,
        token_dir: Path | None = None,
        source_key: str | None = None,
        template: str = "chat",
    ) -> None:
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if (token_dir is None) != (source_key is None):
            raise ValueError("pass token_dir and source_key together (or neither)")
        self.sampling = sampling
        self.template = template
        self.token_dir = token_dir
        self.source_key = source_key
        self._loader = examples if callable(examples) else None
        self._examples: datasets.Dataset | None = None if callable(examples) else examples
        self._tokens: dict[str, TokenizedExamples] = {}
        self._lock = threading.Lock()
        if self._examples is not None:
            self._check(self._examples)

    def _check(self, examples: datasets.Dataset) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in examples.column_names]
        if missing:
            raise ValueError(
                f"node data lacks column(s) {missing} (has {examples.column_names}); "
                "a node's data needs prompt and answer columns"
            )
        if len(examples) == 0:
            raise ValueError("node data is empty; give this node at least one example")
        if self.sampling == "class-balanced" and "label" not in examples.column_names:
            raise ValueError("class-balanced sampling needs a label column; use sampling = 'shuffle'")

    @property
    def examples(self) -> datasets.Dataset:
        """The rows (loaded, and checked, on first access)."""
        with self._lock:
            if self._examples is None:
                if self._loader is None:  # pragma: no cover - the constructor sets one of the two
                    raise RuntimeError("NodeData has neither examples nor a loader")
                examples = self._loader()
                self._check(examples)
                self._examples = examples
            return self._examples

    def __len__(self) -> int:
        if self._examples is None and self._tokens:
            return len(next(iter(self._tokens.values())))
        return len(self.examples)

    def tokenized(
        self, tokenizer: PreTrainedTokenizerBase, *, template: str | None = None
    ) -> TokenizedExamples:
        """Every example's prompt and answer ids for ``tokenizer`` and prompt ``template`` (the
        node's own by default): memory, then disk, then a pass."""
        template = self.template if template is None else template
        key = f"{tokenizer_key(tokenizer)}\0{template}"
        cached = self._tokens.get(key)
        if cached is not None:
            return cached
        path, digest = None, ""
        if self.token_dir is not None and self.source_key is not None:
            digest = hashlib.sha256(f"{self.source_key}\0{key}".encode()).hexdigest()
            path = self.token_dir / f"tokens-{digest[:24]}.npz"
            cached = TokenizedExamples.load(path, digest)
        if cached is None or (self.sampling == "class-balanced" and cached.labels is None):
            from fedtune.data.collate import tokenize_pairs

            ex = self.examples
            prompt_ids, answer_ids = tokenize_pairs(
                tokenizer, list(ex["prompt"]), list(ex["answer"]), template=template
            )
            labels = [str(v) for v in ex["label"]] if "label" in ex.column_names else None
            cached = TokenizedExamples.build(prompt_ids, answer_ids, labels)
            if path is not None:
                cached.save(path, digest)
        self._tokens[key] = cached
        return cached

    def batches(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int,
        max_length: int,
        key: Sequence[int],
        template: str | None = None,
    ) -> Callable[[int], TokenBatch]:
        """``step -> TokenBatch``: an endless, reproducible stream keyed by ``key``.

        ``key`` is (run seed, round, partition id, ...), so every node and round draws its own
        order and a rerun draws the same one. Batches are capped at the node's size. Answers too
        long for ``max_length`` are truncated (:func:`~fedtune.data.collate.assemble_batch`),
        counted once here rather than per batch.
        """
        from fedtune.data.collate import assemble_batch

        tokens = self.tokenized(tokenizer, template=template)
        n = len(tokens)
        truncated = int(np.count_nonzero(np.diff(tokens.answer_offsets) >= max_length))
        if truncated:
            log.warning(
                "%d of this node's %d answers are longer than model.max-length=%d tokens with EOS; "
                "their batches keep the first %d answer tokens and EOS, without the prompt",
                truncated,
                n,
                max_length,
                max_length - 1,
            )
        labels = list(tokens.labels or ()) if self.sampling == "class-balanced" else None
        sampler = BatchSampler(num_examples=n, batch_size=min(batch_size, n), key=key, labels=labels)

        def batch_for_step(_step: int) -> TokenBatch:
            idx = sampler.next_indices()
            return assemble_batch(
                tokenizer,
                [tokens.prompt(i) for i in idx],
                [tokens.answer(i) for i in idx],
                max_length=max_length,
                log_truncated=False,
            )

        return batch_for_step
