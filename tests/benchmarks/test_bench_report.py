"""benchmarks/report.py: the matched-budget report runs end to end and states its targets honestly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
BENCHMARK = "report"


def test_targets_say_met_or_missed(bench: object) -> None:
    text = bench.targets_text(450.0, -16.875)  # type: ignore[attr-defined]
    assert "450x" in text and "-16.88 points" in text and text.count("missed") == 2
    assert bench.targets_text(1000.0, -0.5).count("; met") == 2  # type: ignore[attr-defined]


def test_table_shows_nan_as_na(bench: object) -> None:
    row = {
        "heldout_loss": 1.25,
        "rouge_l": float("nan"),
        "payload_bytes_per_client_round": 16613.6,
        "client_peak_mb": 1576.7,
        "seconds_per_round": float("nan"),
    }
    table = bench.markdown_table({"fedkseed": row})  # type: ignore[attr-defined]
    assert table.splitlines()[-1] == "| fedkseed | 1.2500 | n/a | 16,614 | 1577 | n/a |"


def _run_report(argv: list[str], out: Path) -> Any:
    """report.py as a user runs it; its last stdout line parsed as the JSON result."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_quick_report_runs_from_the_command_line(tmp_path: Path) -> None:
    result = _run_report(["--quick"], tmp_path)
    rows = result["rows"]
    names = [
        "untuned",
        "fedkseed",
        "fedkseed (compact wire)",
        "fedkseed-pro",
        "lora-fedavg",
        "mezo (centralized)",
    ]
    assert list(rows) == names
    fk, lora, compact = rows["fedkseed"], rows["lora-fedavg"], rows["fedkseed (compact wire)"]
    # the compact wire (fp16 up, sparse deltas down) moves fewer bytes for (almost) the same model
    assert compact["payload_bytes_per_client_round"] < fk["payload_bytes_per_client_round"]
    assert math.isclose(compact["heldout_loss"], fk["heldout_loss"], rel_tol=1e-3)
    # bytes come from real messages: adapters dwarf seeds and scalars, and the ratio is their quotient
    assert 0 < fk["payload_bytes_per_client_round"] < lora["payload_bytes_per_client_round"]
    assert math.isclose(
        result["bytes_ratio_lora_over_fedkseed"],
        lora["payload_bytes_per_client_round"] / fk["payload_bytes_per_client_round"],
    )
    assert rows["mezo (centralized)"]["heldout_loss"] < rows["untuned"]["heldout_loss"]
    for name in ("report.md", "report.json", "loss_vs_rounds.png", "loss_vs_bytes.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| lora-fedavg |" in (tmp_path / "report.md").read_text()


def test_reuse_reads_a_row_only_when_its_settings_match(bench: object, tmp_path: Path) -> None:
    settings = bench.shared_settings(bench.parse_args(["--out", str(tmp_path)]))  # type: ignore[attr-defined]
    rows = tmp_path / "rows"
    rows.mkdir()
    row = {"heldout_loss": 0.5, "rouge_l": None, "payload_bytes_per_client_round": 10.0}
    saved = {"row": row, "by_round": [], "by_bytes": [], "untuned": None, "config": settings}
    (rows / "mezo.json").write_text(json.dumps(saved))
    got = bench.run_in_worker("mezo", [], tmp_path, reuse_if=settings)  # type: ignore[attr-defined]
    assert got["reused"] is True and got["row"]["heldout_loss"] == 0.5 and math.isnan(got["row"]["rouge_l"])
    # other settings: the stale row is not used (the worker is started; make it fail fast)
    other = {**settings, "federation.num-rounds": 99}
    with pytest.raises(RuntimeError, match="the mezo worker failed"):
        bench.run_in_worker("mezo", ["--bogus-flag"], tmp_path, reuse_if=other)  # type: ignore[attr-defined]
    assert not (rows / "mezo.json").exists()


def test_default_settings_add_no_task_keys(bench: object) -> None:
    # the reviews report's settings (and --reuse of its rows) stay as they were
    flat = bench.shared_settings(bench.parse_args([]))  # type: ignore[attr-defined]
    assert not any(k in flat for k in ("data.task", "data.heldout-groups", "data.zeroshot-max-new-tokens"))
    assert flat["data.max-new-tokens"] == 6
    qa = bench.shared_settings(  # type: ignore[attr-defined]
        bench.parse_args(["--task", "qa", "--heldout-groups", "history"])  # type: ignore[attr-defined]
    )
    assert qa["data.task"] == "qa" and qa["data.heldout-groups"] == "history"
    assert qa["data.max-new-tokens"] == 32 and qa["data.zeroshot-max-new-tokens"] == 32


def test_methods_run_in_report_order_and_need_a_federated_run_for_untuned(bench: object) -> None:
    args = bench.parse_args(["--methods", "lora-fedavg,untuned,fedkseed"])  # type: ignore[attr-defined]
    assert args.methods == ("untuned", "fedkseed", "lora-fedavg")
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "untuned,mezo"])  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "fedkseed,bogus"])  # type: ignore[attr-defined]


def test_table_has_zero_shot_columns_only_with_held_out_groups(bench: object) -> None:
    row = {
        "heldout_loss": 1.0,
        "rouge_l": 20.0,
        "payload_bytes_per_client_round": 10.0,
        "client_peak_mb": 100.0,
        "seconds_per_round": 1.0,
    }
    assert "zero-shot" not in bench.markdown_table({"a": row})  # type: ignore[attr-defined]
    zs = {**row, "zeroshot_loss": 2.5, "zeroshot_rouge_l": 7.25}
    table = bench.markdown_table({"a": zs})  # type: ignore[attr-defined]
    assert "zero-shot Rouge-L" in table and "| a | 1.0000 | 20.00 | 2.5000 | 7.25 | 10 |" in table


@pytest.mark.slow
def test_quick_qa_report_carries_zero_shot_metrics(tmp_path: Path) -> None:
    groups = "psychology,science,movies,history"
    argv = ["--quick", "--task", "qa", "--heldout-groups", groups, "--methods", "fedkseed,lora-fedavg"]
    result = _run_report(argv, tmp_path)
    assert list(result["rows"]) == ["fedkseed", "lora-fedavg"]
    assert result["config"]["data.heldout-groups"] == groups
    for row in result["rows"].values():
        assert row["zeroshot_loss"] > 0 and 0 <= row["zeroshot_rouge_l"] <= 100
    assert "zero-shot Rouge-L" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "zeroshot_vs_rounds.png").stat().st_size > 0
    # the zero-shot metrics come from the run's own metrics.jsonl
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/*/summary.json")]
    (fk_run,) = [Path(s["run_dir"]) for s in summaries if s["algorithm"] == "fedkseed"]
    last = json.loads((fk_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"zeroshot_loss", "zeroshot_rouge_l", "zeroshot_exact_match"} <= set(last)
