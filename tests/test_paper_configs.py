"""The paper's protocol configs: they parse with the paper's settings, and the same settings at tiny
sizes (a tiny model, a small Dolly- or NI-shaped file, few clients and steps) run to the end with
zero-shot figures in metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedtune.config import RunConfig
from fedtune.flower.testing import run_local
from fedtune.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"eps": 5e-4, "lr": 3e-7, "local_steps": 200, "batch_size": 1, "kind": "gaussian", "k": 4096}


@pytest.mark.parametrize(
    ("name", "rounds", "heldout"),
    [("paper_dolly.toml", 60, ("summarization",)), ("paper_natural_instructions.toml", 40, ("test",))],
)
def test_paper_configs_hold_the_papers_settings(name: str, rounds: int, heldout: tuple[str, ...]) -> None:
    cfg = RunConfig.load(ROOT / "simulations" / name)
    zo = cfg.zo
    assert (zo.eps, zo.lr, zo.local_steps, zo.batch_size, zo.perturbation, cfg.fedkseed.num_seeds) == tuple(
        PAPER.values()
    )
    assert zo.lr_schedule == "constant" and zo.tune == "all"
    assert cfg.model.max_length == 1024 and cfg.data.prompt_template == "alpaca"
    assert cfg.data.heldout_group_names == heldout and cfg.data.zeroshot_max_new_tokens == 128
    fed = cfg.federation
    assert fed.num_rounds == rounds and fed.clients_per_round == round(0.05 * fed.num_clients)


def _dolly_rows() -> list[dict[str, str]]:
    cats = ["open_qa", "classification", "brainstorming", "summarization"]
    return [
        {
            "instruction": f"Question {i} about {cat}?",
            "context": f"Some context {i}." if i % 2 else "",
            "response": f"answer {i % 3}",
            "category": cat,
        }
        for cat in cats
        for i in range(10)
    ]


def _ni_rows() -> list[dict[str, str]]:
    tasks = [f"task{t:03d}_demo" for t in range(5)] + ["test"]
    return [
        {"instruction": f"Definition of {task}.", "input": f"x{i}", "output": f"y{i % 2}", "group": task}
        for task in tasks
        for i in range(8)
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "rows", "clients"),
    [("paper_dolly.toml", _dolly_rows, 3), ("paper_natural_instructions.toml", _ni_rows, 5)],
)
def test_paper_settings_run_at_tiny_sizes(
    name: str, rows: Any, clients: int, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    small = {
        "model.name": str(tiny_model_dir),
        "model.max-length": 64,
        "model.device": "cpu",
        "data.task": str(data),
        "data.heldout-size": 4,
        "data.eval-generations": 2,
        "data.max-new-tokens": 4,
        "data.zeroshot-max-new-tokens": 4,
        "federation.num-clients": clients,
        "federation.clients-per-round": 2,
        "federation.num-rounds": 1,
        "federation.client-gpus": 0.0,
        "federation.node-wait-s": 1.0,
        "zo.local-steps": 2,
        "fedkseed.num-seeds": 64,
        "run.output-dir": str(tmp_path / "runs"),
    }
    cfg = RunConfig.load(ROOT / "simulations" / name, small)
    summary, _ = run_local(cfg)
    rounds = read_jsonl(Path(str(summary["run_dir"])) / "metrics.jsonl")
    last = rounds[-1]
    assert last["round"] == 1 and last["accepted"] == 2
    assert math.isfinite(float(str(last["zeroshot_rouge_l"]))) and math.isfinite(
        float(str(last["zeroshot_loss"]))
    )
    generations = read_jsonl(Path(str(summary["run_dir"])) / "generations.jsonl")
    assert {g["split"] for g in generations} == {"heldout", "zeroshot"}
