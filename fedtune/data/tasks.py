"""Instruction-tuning tasks: every task is a Dataset with ``prompt``, ``answer``, ``label``, ``group``.

``label`` is the class (reviews) or category (QA) used for Dirichlet partitions and class-balanced
sampling; ``group`` (movie or category) is the natural unit for grouped non-IID partitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from fedtune.data.sources import load_chatterbot_qa, load_local_dataset, load_rotten_tomatoes, quiet_datasets

__all__ = [
    "BUILTIN_TASKS",
    "REVIEW_PROMPT",
    "TASK_COLUMNS",
    "TaskSplit",
    "build_task",
    "local_task",
    "qa_task",
    "reviews_task",
    "split_groups",
    "split_heldout",
]

TASK_COLUMNS = ("prompt", "answer", "label", "group")
BUILTIN_TASKS = ("reviews", "reviews-text", "qa", "reviews+qa")
REVIEW_PROMPT = "Movie review: {text}\nIs this review positive or negative? Answer with one word."

_TASK_FEATURES = datasets.Features({c: datasets.Value("string") for c in TASK_COLUMNS})


def _task_dataset(
    prompt: list[str], answer: list[str], label: list[str], group: list[str]
) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"prompt": prompt, "answer": answer, "label": label, "group": group}, features=_TASK_FEATURES
    )


def reviews_task(*, max_chars: int = 160, template: str = REVIEW_PROMPT) -> datasets.Dataset:
    """Sentiment as an instruction: review -> ``positive``/``negative``; short reviews only.

    ``template`` wraps each review (``"{text}"`` gives the bare review, the input a classifier
    reads: the ``reviews-text`` task). ``max_chars`` keeps prompts short (160 keeps ~82% of the
    snippets, <= ~64 tokens with the chat template), which is what makes CPU zeroth-order
    tuning affordable.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1; got {max_chars}")
    rt = load_rotten_tomatoes()
    prompt: list[str] = []
    answer: list[str] = []
    group: list[str] = []
    for text, label, movie in zip(rt["text"], rt["label"], rt["movie"], strict=True):
        if len(text) <= max_chars:
            prompt.append(template.format(text=text))
            answer.append("positive" if label == 1 else "negative")
            group.append(movie)
    return _task_dataset(prompt, answer, list(answer), group)


def qa_task(
    *, exclude_categories: Sequence[str] = ("coding",), max_answer_chars: int = 200
) -> datasets.Dataset:
    """Chatterbot question -> answer as open instructions; long code answers are left out by default."""
    if max_answer_chars < 1:
        raise ValueError(f"max_answer_chars must be >= 1; got {max_answer_chars}")
    excluded = set(exclude_categories)
    qa = load_chatterbot_qa()
    prompt: list[str] = []
    answer: list[str] = []
    category: list[str] = []
    for q, a, cat in zip(qa["instruction"], qa["response"], qa["category"], strict=True):
        if cat not in excluded and len(a) <= max_answer_chars:
            prompt.append(q)
            answer.append(a)
            category.append(cat)
    return _task_dataset(prompt, answer, category, list(category))


def local_task(path: str | Path) -> datasets.Dataset:
    """A task from a local file in any layout of :data:`fedtune.data.formats.FORMATS`.

    (prompt, answer); chat ``messages`` (the last assistant turn is the answer, the turns before
    it the prompt); Alpaca (instruction, input, output) and Dolly (instruction, context,
    response), whose input or context stays part of the prompt; (instruction, response).
    Optional ``label`` and ``group`` columns are kept (as strings), else a ``category`` column
    fills both (Dolly's, so it can be held out), else "". Empty or whitespace-only rows are
    dropped with a logged count.
    """
    from fedtune.data.formats import read_rows

    raw = load_local_dataset(path)
    columns = {name: raw[name] for name in raw.column_names}
    return _task_dataset(*read_rows(columns, len(raw), source=str(path)))


def build_task(name: str, *, max_examples: int | None = None, seed: int = 0) -> datasets.Dataset:
    """Build a task by name (``reviews``, ``reviews-text``, ``qa``, ``reviews+qa``) or from a local file path.

    Rows are shuffled with ``seed`` (datasets' own generator, not the global RNG), then cut to
    ``max_examples``.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be None or >= 1; got {max_examples}")
    if name == "reviews":
        ds = reviews_task()
    elif name == "reviews-text":
        ds = reviews_task(template="{text}")
    elif name == "qa":
        ds = qa_task()
    elif name == "reviews+qa":
        ds = datasets.concatenate_datasets([reviews_task(), qa_task()])
    elif Path(name).suffix:
        ds = local_task(name)
    else:
        raise ValueError(
            f"Unknown task {name!r}: use one of {', '.join(BUILTIN_TASKS)} or a local data file path"
        )
    if len(ds) == 0:
        raise ValueError(f"Task {name!r} has no examples")
    with quiet_datasets():
        ds = ds.shuffle(seed=seed)
        if max_examples is not None:
            ds = ds.select(range(min(max_examples, len(ds))))
        return ds.flatten_indices()  # contiguous rows: faster slicing in the training loops


@dataclass(frozen=True)
class TaskSplit:
    """A task divided into rows for federated training and rows held out for evaluation."""

    train: datasets.Dataset
    heldout: datasets.Dataset


def split_heldout(ds: datasets.Dataset, *, heldout_size: int, seed: int, stratify: bool = True) -> TaskSplit:
    """Deterministically hold out ``heldout_size`` rows, stratified by ``label`` when possible.

    Stratification falls back to a plain seeded split when it cannot work (a single label, or a
    label too rare to appear on both sides).
    """
    if not 1 <= heldout_size < len(ds):
        raise ValueError(
            f"heldout_size must be in [1, {len(ds) - 1}] for a dataset of {len(ds)} rows; got {heldout_size}"
        )
    with quiet_datasets():
        return _split(ds, heldout_size=heldout_size, seed=seed, stratify=stratify)


def _split(ds: datasets.Dataset, *, heldout_size: int, seed: int, stratify: bool) -> TaskSplit:
    if stratify and "label" in ds.column_names and len(set(ds["label"])) > 1:
        names = sorted(set(ds["label"]))
        index = {name: i for i, name in enumerate(names)}
        keyed = ds.add_column(
            "_stratum", [index[v] for v in ds["label"]], feature=datasets.ClassLabel(names=names)
        )
        try:
            parts = keyed.train_test_split(test_size=heldout_size, seed=seed, stratify_by_column="_stratum")
        except ValueError:  # a class with one member, or more classes than held-out rows
            pass
        else:
            return TaskSplit(
                train=parts["train"].remove_columns("_stratum"),
                heldout=parts["test"].remove_columns("_stratum"),
            )
    parts = ds.train_test_split(test_size=heldout_size, seed=seed)
    return TaskSplit(train=parts["train"], heldout=parts["test"])


def split_groups(ds: datasets.Dataset, groups: Sequence[str]) -> TaskSplit:
    """Rows whose ``group`` is in ``groups`` (held out whole, for zero-shot evaluation) and the rest.

    Row order is kept on both sides, so the split is as deterministic as ``ds``. A group absent from
    ``ds`` is a ValueError listing the groups present (a typo must not silently hold out nothing).
    """
    wanted = set(groups)
    column = list(ds["group"])
    present = set(column)
    missing = sorted(wanted - present)
    if missing:
        shown = ", ".join(repr(g) for g in sorted(present)[:40]) + (" ..." if len(present) > 40 else "")
        raise ValueError(
            f"data.heldout-groups names {', '.join(map(repr, missing))}, not a group of this task; "
            f"its groups are {shown}"
        )
    held = [i for i, g in enumerate(column) if g in wanted]
    if len(held) == len(ds):
        raise ValueError("data.heldout-groups holds out every row of the task; leave some groups to train on")
    held_set = set(held)
    with quiet_datasets():
        rest = ds.select([i for i in range(len(ds)) if i not in held_set])
        return TaskSplit(train=rest.flatten_indices(), heldout=ds.select(held).flatten_indices())
