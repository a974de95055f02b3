"""Metrics JSONL: append-only, strict JSON (non-finite floats become null), corrupt lines named; PNG plots."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fedtune.runlog import MetricsLog, MetricValue, plot_curves, read_jsonl


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the 8-byte signature
    return int(width), int(height)


def test_append_then_read_round_trips_and_nulls_non_finite(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "deep" / "run" / "metrics.jsonl")  # parent folders are created
    log.append({"round": 0, "heldout_loss": 2.5, "rouge_l": float("nan"), "ok": True, "name": "a", "x": None})
    log.append({"round": 1, "heldout_loss": float("inf"), "train_loss": float("-inf"), "time": 12.0})
    records = log.read()
    assert len(records) == 2
    first, second = records
    assert first["round"] == 0 and first["heldout_loss"] == 2.5
    assert first["rouge_l"] is None and first["ok"] is True and first["name"] == "a" and first["x"] is None
    assert isinstance(first["time"], float) and first["time"] > 1.6e9  # wall clock added when absent
    assert second["heldout_loss"] is None and second["train_loss"] is None
    assert second["time"] == 12.0  # an explicit time is kept
    # one strict-JSON object per line with sorted keys
    lines = log.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "NaN" not in lines[0] and "Infinity" not in lines[1]
    assert list(json.loads(lines[1])) == sorted(json.loads(lines[1]))


def test_a_second_log_on_the_same_file_appends(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    MetricsLog(path).append({"round": 1, "time": 1.0})
    MetricsLog(path).append({"round": 2, "time": 2.0})
    assert read_jsonl(path) == [{"round": 1, "time": 1.0}, {"round": 2, "time": 2.0}]


def test_read_jsonl_missing_file_is_empty_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "nope.jsonl") == []
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_names_the_corrupt_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"m\.jsonl:2 is not valid JSON.*corrupt"):
        read_jsonl(path)


RECORDS: list[dict[str, MetricValue]] = [
    {"round": 0, "heldout_loss": 3.0, "rouge_l": 10.0},
    {"round": 1, "heldout_loss": 2.5, "rouge_l": 12.0, "train_loss": 2.9},
    {"round": 2, "heldout_loss": 2.0, "rouge_l": None, "train_loss": 2.7},
]


def test_plot_curves_writes_one_panel_per_present_metric(tmp_path: Path) -> None:
    # figsize is 4.2 in per panel x 3.4 in at 110 dpi: the PNG width counts the panels.
    three = plot_curves(RECORDS, tmp_path / "plots" / "three.png", title="demo")
    assert three == tmp_path / "plots" / "three.png"
    assert _png_size(three) == (round(3 * 4.2 * 110), round(3.4 * 110))
    # train_loss absent from every record -> its panel is skipped
    two = plot_curves(
        [{k: v for k, v in r.items() if k != "train_loss"} for r in RECORDS], tmp_path / "2.png"
    )
    assert _png_size(two)[0] == round(2 * 4.2 * 110)
    # Rouge-L NaN in every record (generations off) is no curve either: no empty panel
    no_rouge = plot_curves([{**r, "rouge_l": float("nan")} for r in RECORDS], tmp_path / "nan.png")
    assert _png_size(no_rouge)[0] == round(2 * 4.2 * 110)
    # a run with data.heldout-groups adds the zero-shot Rouge-L panel
    zs = plot_curves([{**r, "zeroshot_rouge_l": 5.0} for r in RECORDS], tmp_path / "zs.png")
    assert _png_size(zs)[0] == round(4 * 4.2 * 110)


def test_extend_appends_rows_without_a_time_stamp(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "generations.jsonl")
    log.extend([{"round": 0, "generation": "a"}, {"round": 0, "generation": "b"}])
    log.extend([])
    log.extend([{"round": 1, "generation": "c"}])
    assert log.read() == [
        {"round": 0, "generation": "a"},
        {"round": 0, "generation": "b"},
        {"round": 1, "generation": "c"},
    ]


def test_plot_curves_custom_axis_and_panels(tmp_path: Path) -> None:
    records: list[dict[str, MetricValue]] = [{"step": i, "acc": i / 10} for i in range(4)]
    out = plot_curves(records, tmp_path / "acc.png", x="step", panels=[("acc", "accuracy"), ("f1", "F1")])
    assert _png_size(out)[0] == round(4.2 * 110)


def test_plot_curves_without_any_metric_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no plottable metrics among"):
        plot_curves([{"round": 0, "heldout_loss": None}, {"round": 1, "note": "x"}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
