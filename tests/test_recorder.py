"""Run folders never overwrite each other; the recorder's JSONL, summary figures and plots."""

from __future__ import annotations

import json
import re
import time
import types
from pathlib import Path

import pytest

import fedtune.recorder as recorder_mod
from fedtune.config import RunConfig
from fedtune.recorder import RunRecorder, new_run_dir
from fedtune.runlog import MetricValue, read_jsonl


def _cfg(tmp_path: Path) -> RunConfig:
    return RunConfig.from_flat(
        {"run.output-dir": str(tmp_path / "runs"), "run.name": "demo", "federation.num-rounds": 2}
    )


def test_new_run_dir_writes_the_config_and_never_reuses_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A frozen clock: three runs started in the same second.
    frozen = types.SimpleNamespace(strftime=lambda fmt: "20240102-030405", perf_counter=time.perf_counter)
    monkeypatch.setattr(recorder_mod, "time", frozen)
    cfg = _cfg(tmp_path)
    dirs = [new_run_dir(cfg) for _ in range(3)]
    root = tmp_path / "runs" / "demo"
    assert dirs == [root / "20240102-030405", root / "20240102-030405-2", root / "20240102-030405-3"]
    for d in dirs:
        assert RunConfig.load(d / "config.toml") == cfg


def test_new_run_dir_is_named_by_local_time(tmp_path: Path) -> None:
    path = new_run_dir(_cfg(tmp_path))
    assert path.parent == tmp_path / "runs" / "demo"
    assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", path.name)


ROUNDS: list[dict[str, MetricValue]] = [
    {"round": 0, "heldout_loss": 3.0, "rouge_l": 10.0, "exact_match": 0.1},
    {
        "round": 1,
        "applied": True,
        "heldout_loss": 2.5,
        "rouge_l": 12.0,
        "exact_match": 0.2,
        "train_loss": 2.9,
        "payload_bytes_up": 100,
        "payload_bytes_down": 300,
        "message_bytes_up": 150,
        "message_bytes_down": 350,
        "round_s": 1.0,
        "client_peak_mb": 50.25,
    },
    {
        "round": 2,
        "applied": True,
        "heldout_loss": 2.0,
        "rouge_l": 15.0,
        "exact_match": 0.3,
        "train_loss": 2.7,
        "payload_bytes_up": 201,
        "payload_bytes_down": 500,
        "message_bytes_up": 250,
        "message_bytes_down": 550,
        "round_s": 2.0,
        "client_peak_mb": 70.04,
    },
]


def test_record_and_finish_write_jsonl_summary_and_plot(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = RunRecorder(run_dir, cfg, quiet=True)
    for r in ROUNDS:
        rec.record(r)
    summary = rec.finish({"completed_rounds": 2, "stopped_early": False})

    on_disk = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in on_disk] == [0, 1, 2]
    assert all(isinstance(r["elapsed_s"], float) and r["elapsed_s"] >= 0 for r in on_disk)
    assert on_disk[2]["payload_bytes_up"] == 201 and rec.records[1]["train_loss"] == 2.9

    wall_s = summary.pop("wall_s")
    assert isinstance(wall_s, float) and wall_s >= 0
    assert summary == {
        "run_dir": str(run_dir),
        "algorithm": "fedkseed",
        "rounds": 2,
        "initial_heldout_loss": 3.0,
        "final_heldout_loss": 2.0,
        "initial_rouge_l": 10.0,
        "final_rouge_l": 15.0,
        "initial_exact_match": 0.1,
        "final_exact_match": 0.3,
        # means over the trained rounds only (round 0 carries no traffic)
        "mean_payload_bytes_up": 150.5,
        "mean_payload_bytes_down": 400.0,
        "mean_message_bytes_up": 200.0,
        "mean_message_bytes_down": 450.0,
        "mean_round_s": 1.5,
        "client_peak_mb": 70.0,  # the peak, rounded to 0.1 MB
        "completed_rounds": 2,
        "stopped_early": False,
    }
    assert json.loads((run_dir / "summary.json").read_text(encoding="utf-8")) == {**summary, "wall_s": wall_s}
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_json_is_strict_json_when_generations_are_off(tmp_path: Path) -> None:
    # data.eval-generations = 0 gives NaN Rouge-L; bare NaN in summary.json breaks strict readers
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = RunRecorder(run_dir, _cfg(tmp_path), quiet=True)
    rec.record({"round": 0, "heldout_loss": 3.0, "rouge_l": float("nan")})
    rec.record({"round": 1, "heldout_loss": 2.5, "rouge_l": float("nan"), "payload_bytes_up": 10})
    summary = rec.finish()
    text = (run_dir / "summary.json").read_text(encoding="utf-8")
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert loaded["final_rouge_l"] is None and summary["final_rouge_l"] is None
    assert loaded["final_heldout_loss"] == 2.5


def test_finish_with_partial_traffic_fields_and_one_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = RunRecorder(run_dir, _cfg(tmp_path), quiet=True)
    rec.record({"round": 1, "applied": True, "heldout_loss": 3.0, "payload_bytes_up": 10})
    summary = rec.finish()
    # one record: first == last, no plot; traffic keys it never reported are None
    assert summary["initial_heldout_loss"] == summary["final_heldout_loss"] == 3.0
    assert summary["initial_rouge_l"] is None and summary["rounds"] == 1
    assert summary["mean_payload_bytes_up"] == 10.0 and summary["mean_payload_bytes_down"] is None
    assert summary["mean_round_s"] is None and summary["client_peak_mb"] is None
    assert not (run_dir / "curves.png").exists() and (run_dir / "summary.json").is_file()


def test_finish_without_evaluations_or_traffic_has_only_the_basics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = RunRecorder(run_dir, _cfg(tmp_path), quiet=True)
    summary = rec.finish({"note": "empty"})
    assert set(summary) == {"run_dir", "algorithm", "rounds", "wall_s", "note"}
    assert summary["rounds"] == 0 and rec.records == []


def test_progress_line_formats_present_values_and_dashes_missing_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = RunRecorder(run_dir, _cfg(tmp_path), quiet=False)
    line = rec._progress_line(
        {"round": 1, "train_loss": 2.912345, "heldout_loss": None, "payload_bytes_up": 12345, "round_s": 3.25}
    )
    assert line.startswith("[bold]round 1/2[/bold]")
    for part in ("train 2.9123", "held-out -", "Rouge-L -", "EM -", "up 12,345 B", "down - B", "3.2 s"):
        assert part in line, part
    rec.record({"round": 1, "heldout_loss": 2.0})
    rec.finish()
    out = capsys.readouterr().out
    assert "round 1/2" in out and "finished" in out and "[bold]" not in out  # rich renders the markup


def test_quiet_recorder_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = RunRecorder(run_dir, _cfg(tmp_path), quiet=True)
    rec.record({"round": 0, "heldout_loss": 2.0})
    rec.finish()
    assert capsys.readouterr().out == ""


def test_skipped_rounds_do_not_enter_the_averages(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = RunRecorder(run_dir, _cfg(tmp_path), quiet=True)
    rec.record({"round": 0, "heldout_loss": 3.0})
    rec.record({"round": 1, "applied": True, "heldout_loss": 2.0, "payload_bytes_up": 10, "round_s": 1.0})
    rec.record({"round": 2, "applied": False, "payload_bytes_up": 99, "round_s": 50.0})
    summary = rec.finish()
    assert summary["final_heldout_loss"] == 2.0 and summary["mean_payload_bytes_up"] == 10.0
    assert summary["mean_round_s"] == 1.0 and summary["rounds"] == 2


def test_resumed_recorder_keeps_rows_up_to_the_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rec = RunRecorder(run_dir, _cfg(tmp_path), quiet=True)
    for r in range(4):
        rec.record({"round": r, "applied": True, "heldout_loss": 3.0 - r})
    with pytest.raises(ValueError, match="resume"):
        RunRecorder(run_dir, _cfg(tmp_path), quiet=True)  # never appends to another run's metrics
    again = RunRecorder(run_dir, _cfg(tmp_path), quiet=True, resume=True)
    again.restore(up_to_round=2)
    assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
    assert [r["round"] for r in again.records] == [0, 1, 2]


def test_generations_are_written_with_readable_prompts(tmp_path: Path) -> None:
    from fedtune.data.prompts import encode_prompt

    rec = RunRecorder(tmp_path, RunConfig(), quiet=True)
    rec.record_generations(1, "zeroshot", [encode_prompt("Summarize.", "A long text.")], ["ref"], ["gen"])
    (row,) = read_jsonl(tmp_path / "generations.jsonl")
    want = {"round": 1, "split": "zeroshot", "prompt": "Summarize.\n\nA long text."}
    assert row == {**want, "reference": "ref", "generation": "gen"}
