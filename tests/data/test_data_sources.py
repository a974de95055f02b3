"""Builtin corpora and local data files load as datasets.Dataset."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from fedtune.data.sources import load_chatterbot_qa, load_local_dataset, load_rotten_tomatoes, load_source

ROWS = [
    {"instruction": "Say hi", "response": "hi", "category": "greet"},
    {"instruction": "Say bye", "response": "bye", "category": "greet"},
    {"instruction": "2+2?", "response": "4", "category": "math"},
]


def test_rotten_tomatoes_columns_and_counts() -> None:
    rt = load_rotten_tomatoes()
    assert isinstance(rt, datasets.Dataset)
    assert rt.column_names == ["text", "label", "movie"]
    assert len(rt) == 12752  # 12,808 fresh/rotten snippets minus 56 duplicate texts
    assert set(rt["label"]) == {0, 1}
    assert sum(rt["label"]) == 7368
    assert len(set(rt["text"])) == len(rt)
    assert max(len(t) for t in rt["text"]) < 300  # no plot synopses


def test_rotten_tomatoes_returns_independent_datasets() -> None:
    a = load_rotten_tomatoes()
    a.set_format("numpy")  # in-place on the Dataset object
    assert load_rotten_tomatoes().format["type"] is None


def test_chatterbot_qa_columns_and_order() -> None:
    qa = load_chatterbot_qa()
    assert qa.column_names == ["instruction", "response", "category"]
    assert len(qa) == 2188
    assert qa[0] == {
        "instruction": "What is AI?",
        "response": qa[0]["response"],
        "category": "AI",
    }  # ai.yml sorts first
    assert qa[0]["response"].startswith("Artificial Intelligence")
    assert {"coding", "tech support", "trivia"} <= set(qa["category"])


def test_chatterbot_unknown_language_lists_available() -> None:
    with pytest.raises(ValueError, match="english"):
        load_chatterbot_qa("klingon")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_load(tmp_path: Path, suffix: str) -> None:
    # Prepare
    path = tmp_path / f"qa{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    else:
        ds = datasets.Dataset.from_list(ROWS)
        if suffix == ".csv":
            ds.to_csv(str(path), index=False)
        else:
            ds.to_parquet(str(path))
    # Execute
    loaded = load_local_dataset(path)
    # Assert
    assert isinstance(loaded, datasets.Dataset)
    assert loaded.to_list() == ROWS
    assert load_source(str(path)).to_list() == ROWS


def test_local_errors(tmp_path: Path) -> None:
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.jsonl"):
        load_local_dataset(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        load_local_dataset(tmp_path / "missing.csv")


def test_load_source_by_name() -> None:
    assert len(load_source("chatterbot-qa")) == 2188
    assert load_source("rotten-tomatoes").column_names == ["text", "label", "movie"]
    with pytest.raises(ValueError, match="rotten-tomatoes"):
        load_source("imdb")


def test_load_hamlet_is_the_play() -> None:
    from fedtune.data.sources import load_hamlet

    text = load_hamlet()
    assert isinstance(text, str)
    assert len(text) > 100_000
    assert "Hamlet" in text
    assert "To be, or not to be" in text
