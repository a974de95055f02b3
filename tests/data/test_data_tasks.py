"""Instruction tasks and the held-out split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from fedtune.data.tasks import REVIEW_PROMPT, TASK_COLUMNS, build_task, qa_task, reviews_task, split_heldout


def test_reviews_task_format() -> None:
    ds = reviews_task(max_chars=160)
    assert ds.column_names == list(TASK_COLUMNS)
    row = ds[0]
    assert row["prompt"].startswith("Movie review: ")
    assert row["prompt"].endswith("\nIs this review positive or negative? Answer with one word.")
    assert set(ds["answer"]) == {"positive", "negative"}
    assert ds["label"] == ds["answer"]
    assert len(ds) > 8000  # ~82% of 12,752 are <= 160 characters
    longest = max(len(p) for p in ds["prompt"]) - len(REVIEW_PROMPT.format(text=""))
    assert longest <= 160
    assert len(reviews_task(max_chars=60)) < len(ds)


def test_qa_task_excludes_coding_and_long_answers() -> None:
    ds = qa_task()
    assert "coding" not in set(ds["label"])
    assert max(len(a) for a in ds["answer"]) <= 200
    assert ds["label"] == ds["group"]
    assert "coding" in set(qa_task(exclude_categories=(), max_answer_chars=2000)["label"])


def test_build_task_is_deterministic_and_seeded(reviews_task_small: datasets.Dataset) -> None:
    again = build_task("reviews", max_examples=200, seed=0)
    other = build_task("reviews", max_examples=200, seed=1)
    assert len(reviews_task_small) == 200
    assert again["prompt"] == reviews_task_small["prompt"]
    assert other["prompt"] != reviews_task_small["prompt"]


def test_build_mixed_task() -> None:
    ds = build_task("reviews+qa", max_examples=400, seed=0)
    labels = set(ds["label"])
    assert {"positive", "negative"} <= labels and len(labels) > 2


def test_build_task_errors() -> None:
    with pytest.raises(ValueError, match="reviews\\+qa"):
        build_task("sst2")
    with pytest.raises(ValueError, match="max_examples"):
        build_task("qa", max_examples=0)


def test_local_task_column_variants(tmp_path: Path) -> None:
    # Prepare
    a = tmp_path / "a.jsonl"
    a.write_text(
        "\n".join(json.dumps({"prompt": f"p{i}", "answer": f"a{i}", "label": i % 2}) for i in range(5))
    )
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"instruction": "q", "response": "r", "group": "g"}]))
    c = tmp_path / "c.json"
    c.write_text(json.dumps([{"question": "q", "reply": "r"}]))
    # Execute
    ta = build_task(str(a), seed=0)
    tb = build_task(str(b))
    # Assert
    assert ta.column_names == list(TASK_COLUMNS)
    assert sorted(ta["label"]) == ["0", "0", "0", "1", "1"]  # stringified
    assert set(ta["group"]) == {""}
    assert tb[0] == {"prompt": "q", "answer": "r", "label": "", "group": "g"}
    with pytest.raises(ValueError, match="instruction, response"):
        build_task(str(c))


def test_split_heldout_is_stratified_and_disjoint(reviews_task_small: datasets.Dataset) -> None:
    # Execute
    split = split_heldout(reviews_task_small, heldout_size=50, seed=0)
    again = split_heldout(reviews_task_small, heldout_size=50, seed=0)
    # Assert
    assert len(split.heldout) == 50 and len(split.train) == 150
    assert not set(split.heldout["prompt"]) & set(split.train["prompt"])
    assert split.heldout["prompt"] == again.heldout["prompt"]
    full = Counter(reviews_task_small["label"])
    held = Counter(split.heldout["label"])
    for label, n in full.items():
        assert abs(held[label] - 50 * n / len(reviews_task_small)) <= 1
    assert split.train.column_names == list(TASK_COLUMNS)


def test_split_falls_back_when_stratification_is_impossible() -> None:
    ds = datasets.Dataset.from_dict(
        {
            "prompt": list("abcdef"),
            "answer": list("abcdef"),
            "label": ["x", "y", "y", "y", "y", "y"],
            "group": [""] * 6,
        }
    )
    split = split_heldout(ds, heldout_size=2, seed=0)  # "x" has a single row
    assert len(split.heldout) == 2 and len(split.train) == 4


@pytest.mark.parametrize("size", [0, 200, 201])
def test_split_heldout_size_is_validated(reviews_task_small: datasets.Dataset, size: int) -> None:
    with pytest.raises(ValueError, match="heldout_size"):
        split_heldout(reviews_task_small, heldout_size=size, seed=0)
