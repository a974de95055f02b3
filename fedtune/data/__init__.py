"""Corpora, instruction tasks, federated partitions, tokenized batches and minibatch sampling.

Exports resolve lazily (PEP 562) so that importing one light submodule, e.g.
``fedtune.data.partition`` in a Flower app, does not pull in transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.data.batch import TokenBatch
    from fedtune.data.collate import (
        IGNORE_INDEX,
        PromptBatch,
        encode_examples,
        encode_prompts,
        format_prompt,
        generate_answers,
    )
    from fedtune.data.partition import PARTITION_SCHEMES, partition_dataset
    from fedtune.data.sampler import BatchSampler
    from fedtune.data.sources import (
        BUILTIN_SOURCES,
        load_chatterbot_qa,
        load_local_dataset,
        load_rotten_tomatoes,
        load_source,
    )
    from fedtune.data.tasks import BUILTIN_TASKS, TaskSplit, build_task, split_heldout

_EXPORTS = {
    "TokenBatch": "batch",
    "IGNORE_INDEX": "collate",
    "PromptBatch": "collate",
    "encode_examples": "collate",
    "encode_prompts": "collate",
    "format_prompt": "collate",
    "generate_answers": "collate",
    "PARTITION_SCHEMES": "partition",
    "partition_dataset": "partition",
    "BatchSampler": "sampler",
    "BUILTIN_SOURCES": "sources",
    "load_chatterbot_qa": "sources",
    "load_local_dataset": "sources",
    "load_rotten_tomatoes": "sources",
    "load_source": "sources",
    "BUILTIN_TASKS": "tasks",
    "TaskSplit": "tasks",
    "build_task": "tasks",
    "split_heldout": "tasks",
}

__all__ = [
    "BUILTIN_SOURCES",
    "BUILTIN_TASKS",
    "IGNORE_INDEX",
    "PARTITION_SCHEMES",
    "BatchSampler",
    "PromptBatch",
    "TaskSplit",
    "TokenBatch",
    "build_task",
    "encode_examples",
    "encode_prompts",
    "format_prompt",
    "generate_answers",
    "load_chatterbot_qa",
    "load_local_dataset",
    "load_rotten_tomatoes",
    "load_source",
    "partition_dataset",
    "split_heldout",
]


def __getattr__(name: str) -> Any:
    submodule = _EXPORTS.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value
    return value
