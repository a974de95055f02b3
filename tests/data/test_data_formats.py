"""Local task files in the layouts people bring them: each read from a small file through build_task."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedtune.data.prompts import decode_prompt, prompt_text
from fedtune.data.tasks import build_task


def _jsonl(tmp_path: Path, rows: list[dict[str, object]], name: str = "data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _rows(path: str) -> dict[str, tuple[str, str, str]]:
    ds = build_task(path)
    return {
        a: (p, lab, g)
        for p, a, lab, g in zip(ds["prompt"], ds["answer"], ds["label"], ds["group"], strict=True)
    }


def test_alpaca_with_and_without_input(tmp_path: Path) -> None:
    rows = _rows(
        _jsonl(
            tmp_path,
            [
                {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                {"instruction": "Name a colour.", "input": "", "output": "Blue"},
            ],
        )
    )
    assert decode_prompt(rows["5"][0]).input == "2 and 3"
    assert prompt_text(rows["5"][0]) == "Add the numbers.\n\n2 and 3"
    assert rows["Blue"][0] == "Name a colour."  # no input: a plain prompt


def test_dolly_keeps_context_and_category_becomes_group(tmp_path: Path) -> None:
    row = {"instruction": "Who wrote it?", "context": "Hamlet is by Shakespeare.", "response": "Shakespeare"}
    rows = _rows(
        _jsonl(tmp_path, [{**row, "category": "closed_qa"}, {**row, "response": "W.S.", "category": "qa"}])
    )
    prompt, label, group = rows["Shakespeare"]
    assert decode_prompt(prompt).input == "Hamlet is by Shakespeare."
    assert (label, group) == ("closed_qa", "closed_qa")


def test_messages_single_and_multi_turn(tmp_path: Path) -> None:
    single = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    rows = _rows(_jsonl(tmp_path, [{"messages": single}, {"messages": multi}]))
    assert rows["Hello."][0] == "Hi?"
    turns = decode_prompt(rows["Rome."][0]).messages  # every turn before the last assistant turn
    assert turns == (
        ("system", "Be brief."),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
    )


@pytest.mark.parametrize("columns", [("prompt", "answer"), ("instruction", "response")])
def test_prompt_answer_forms_in_csv(tmp_path: Path, columns: tuple[str, str]) -> None:
    path = tmp_path / "data.csv"
    path.write_text(f"{columns[0]},{columns[1]},group\nWhat is 2+2?,4,math\n", encoding="utf-8")
    assert _rows(str(path)) == {"4": ("What is 2+2?", "", "math")}


def test_unknown_columns_name_what_was_found_and_every_format(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"question": "q", "reply": "a"}])
    with pytest.raises(ValueError, match=r"\['question', 'reply'\]") as err:
        build_task(path)
    for fmt in ("prompt/answer", "chat messages", "Alpaca", "Dolly", "instruction/response"):
        assert fmt in str(err.value)


def test_empty_rows_are_dropped_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _jsonl(
        tmp_path,
        [
            {"prompt": "Fine?", "answer": "Yes."},
            {"prompt": "   ", "answer": "orphan"},
            {"prompt": "No answer", "answer": " \n"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="fedtune.data.formats"):
        ds = build_task(path)
    assert list(ds["answer"]) == ["Yes."]
    assert "dropped 2 of 3 prompt/answer rows" in caplog.text


def test_a_file_without_usable_rows_is_an_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"messages": [{"role": "user", "content": "Hi?"}]}])  # no assistant turn
    with pytest.raises(ValueError, match="none of its 1 chat messages rows"):
        build_task(path)
