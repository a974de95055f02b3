"""benchmarks/report.py: the matched-budget report runs end to end and states its targets honestly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.slow
def test_quick_report_runs_from_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
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
