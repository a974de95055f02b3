"""Zero-shot evaluation on held-out QA categories, and generations.jsonl, in real in-process runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.fedkseed.replica import clear_replicas
from fedtune.flower.testing import run_local
from fedtune.runlog import read_jsonl

QA_ZEROSHOT = {
    "data.task": "qa",
    "data.partition": "iid",
    "data.heldout-groups": "history",
    "data.zeroshot-max-new-tokens": 3,
}


def generation_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "generations.jsonl").read_text().splitlines()]


def test_a_run_with_a_category_held_out_scores_it_and_writes_generations(
    run_cfg: Any, tmp_path: Path
) -> None:
    cfg: RunConfig = run_cfg(**QA_ZEROSHOT)
    summary, _ = run_local(cfg, run_dir=tmp_path / "run")
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in metrics] == [0, 1, 2]
    for row in metrics:
        for key in ("zeroshot_rouge_l", "zeroshot_loss", "zeroshot_loss_per_example", "heldout_loss"):
            value = row[key]
            assert isinstance(value, float) and math.isfinite(value), (row["round"], key)
        assert row["heldout_loss_per_example"] != row["heldout_loss"]
    assert isinstance(summary["final_zeroshot_rouge_l"], float)
    gens = generation_rows(tmp_path / "run")
    # eval-generations = 2 per split, per evaluated round (0 = the untuned model)
    assert [(g["round"], g["split"]) for g in gens] == [
        (r, s) for r in (0, 1, 2) for s in ("heldout", "heldout", "zeroshot", "zeroshot")
    ]
    assert all(set(g) == {"round", "split", "prompt", "reference", "generation"} for g in gens)
    assert all(isinstance(g["generation"], str) for g in gens)
    # the zero-shot prompts are history questions, which no client trained on
    from fedtune.experiment import build_federated_data

    data = build_federated_data(cfg)
    assert data.zeroshot is not None
    history = set(data.zeroshot["prompt"])
    assert {g["prompt"] for g in gens if g["split"] == "zeroshot"} <= history
    assert not history & {q for p in data.train_partitions for q in p["prompt"]}
    assert (tmp_path / "run" / "curves.png").is_file()


def test_resume_keeps_generations_consistent(run_cfg: Any, tmp_path: Path) -> None:
    cfg: RunConfig = run_cfg(
        **{**QA_ZEROSHOT, "federation.num-rounds": 3, "fedkseed.rebuild-each-round": True}
    )
    run_local(cfg, run_dir=tmp_path / "full", state_dir=tmp_path / "state-full")
    clear_replicas()
    run_local(cfg, run_dir=tmp_path / "resumed", state_dir=tmp_path / "state", stop_after=1)
    # A crash after round 2's evaluation but before its checkpoint leaves rows past the checkpoint.
    stray = {"round": 2, "split": "heldout", "prompt": "p", "reference": "r", "generation": "g"}
    with (tmp_path / "resumed" / "generations.jsonl").open("a") as fh:
        fh.write(json.dumps(stray) + "\n")
    clear_replicas()
    run_local(cfg, run_dir=tmp_path / "resumed", resume=True, state_dir=tmp_path / "state")
    resumed = generation_rows(tmp_path / "resumed")
    assert resumed == generation_rows(tmp_path / "full")
    assert [g["round"] for g in resumed] == [r for r in (0, 1, 2, 3) for _ in range(4)]
