"""build_federated_data: held-out split, capped training pool and client partitions, all from the config.

A small local JSONL task keeps these fast and makes every row countable.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedtune.config import RunConfig
from fedtune.experiment import build_federated_data, build_federated_data_from

ROWS = 30


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    build_federated_data_from.cache_clear()
    yield
    build_federated_data_from.cache_clear()


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "task.jsonl"
    rows = [
        {"prompt": f"question {i}", "answer": f"answer {i}", "label": "ab"[i % 2], "group": f"g{i % 5}"}
        for i in range(ROWS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(task: Path, **overrides: Any) -> RunConfig:
    flat: dict[str, Any] = {
        "data.task": str(task),
        "data.heldout-size": 6,
        "data.eval-generations": 0,
        "data.max-train-examples": 20,
        "data.partition": "iid",
        "federation.num-clients": 4,
        **overrides,
    }
    return RunConfig.from_flat(flat)


def test_split_sizes_cap_and_disjointness(task_file: Path) -> None:
    data = build_federated_data(_cfg(task_file))
    assert len(data.heldout) == 6 and len(data.train_partitions) == 4
    parts = [list(p["prompt"]) for p in data.train_partitions]
    train = [q for p in parts for q in p]
    assert len(train) == 20 and len(set(train)) == 20  # capped; no row in two partitions
    assert all(len(p) == 5 for p in parts)  # iid: equal shards
    assert not set(train) & set(data.heldout["prompt"])
    assert set(train) | set(data.heldout["prompt"]) <= {f"question {i}" for i in range(ROWS)}
    # stratified held-out split: 15 "a" and 15 "b" rows -> 3 of each
    assert Counter(data.heldout["label"]) == {"a": 3, "b": 3}


def test_zero_cap_keeps_the_whole_training_pool(task_file: Path) -> None:
    data = build_federated_data(_cfg(task_file, **{"data.max-train-examples": 0}))
    assert sum(len(p) for p in data.train_partitions) == ROWS - 6


def test_same_config_same_data_and_cached(task_file: Path) -> None:
    cfg = _cfg(task_file)
    first = build_federated_data(cfg)
    # The cache key is the data section, client count and seed: unrelated keys share the result.
    assert build_federated_data(_cfg(task_file, **{"zo.lr": 1e-5, "run.name": "other"})) is first
    build_federated_data_from.cache_clear()
    again = build_federated_data(cfg)  # a rebuild (another process) gives the same rows
    assert again is not first
    assert list(again.heldout["prompt"]) == list(first.heldout["prompt"])
    for a, b in zip(again.train_partitions, first.train_partitions, strict=True):
        assert list(a["prompt"]) == list(b["prompt"])


def test_another_seed_gives_another_split(task_file: Path) -> None:
    a = build_federated_data(_cfg(task_file, **{"run.seed": 1}))
    b = build_federated_data(_cfg(task_file, **{"run.seed": 2}))
    assert set(a.heldout["prompt"]) != set(b.heldout["prompt"])


def test_partition_scheme_comes_from_the_config(task_file: Path) -> None:
    data = build_federated_data(_cfg(task_file, **{"data.partition": "group", "data.max-train-examples": 0}))
    owners: dict[str, set[int]] = {}
    for i, part in enumerate(data.train_partitions):
        for g in part["group"]:
            owners.setdefault(g, set()).add(i)
    # group scheme: each of the 5 groups lives on exactly one of the 4 clients
    assert len(owners) == 5 and all(len(v) == 1 for v in owners.values())


def test_heldout_as_large_as_the_task_is_rejected(task_file: Path) -> None:
    cfg = _cfg(task_file, **{"data.heldout-size": ROWS})
    with pytest.raises(ValueError, match=f"data.heldout_size={ROWS} leaves no training data from {ROWS}"):
        build_federated_data(cfg)


def test_missing_task_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_federated_data(_cfg(tmp_path / "missing.jsonl"))


def test_the_build_is_cached_per_data_section(task_file: Path) -> None:
    cfg = _cfg(task_file)
    assert build_federated_data_from(
        cfg.data, cfg.federation.num_clients, cfg.run.seed
    ) is build_federated_data(cfg)


# -- zero-shot groups (data.heldout-groups) ------------------------------------------------------
def test_heldout_groups_never_reach_a_client_and_form_the_zeroshot_split(task_file: Path) -> None:
    cfg = _cfg(task_file, **{"data.heldout-groups": "g1,g3", "data.max-train-examples": 0})
    data = build_federated_data(cfg)
    assert data.zeroshot is not None
    # g1 and g3 hold 12 of 30 rows; the zero-shot split is cut to data.heldout-size (6)
    assert len(data.zeroshot) == 6 and set(data.zeroshot["group"]) <= {"g1", "g3"}
    train = [g for p in data.train_partitions for g in p["group"]]
    assert len(train) == 30 - 12 - 6 and not {"g1", "g3"} & set(train)
    assert not {"g1", "g3"} & set(data.heldout["group"]) and len(data.heldout) == 6
    # a client rebuilds its partition from the same inputs (fedtune.runtime.node._partition)
    build_federated_data_from.cache_clear()
    again = build_federated_data_from(cfg.data, cfg.federation.num_clients, cfg.run.seed)
    assert [list(p["prompt"]) for p in again.train_partitions] == [
        list(p["prompt"]) for p in data.train_partitions
    ]
    assert again.zeroshot is not None and list(again.zeroshot["prompt"]) == list(data.zeroshot["prompt"])


def test_no_heldout_groups_no_zeroshot_split(task_file: Path) -> None:
    assert build_federated_data(_cfg(task_file)).zeroshot is None


def test_unknown_heldout_group_lists_the_groups_present(task_file: Path) -> None:
    with pytest.raises(ValueError, match=r"'nope', not a group of this task; its groups are 'g0', 'g1'"):
        build_federated_data(_cfg(task_file, **{"data.heldout-groups": "g1,nope"}))


def test_holding_out_every_group_is_refused(task_file: Path) -> None:
    with pytest.raises(ValueError, match="holds out every row"):
        build_federated_data(_cfg(task_file, **{"data.heldout-groups": "g0,g1,g2,g3,g4"}))


def test_qa_category_held_out(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({"data.task": "qa", "data.heldout-groups": "history", "data.heldout-size": 64})
    data = build_federated_data(cfg)
    assert data.zeroshot is not None and set(data.zeroshot["group"]) == {"history"}
    assert len(data.zeroshot) == 8  # every history row: fewer than data.heldout-size
    assert all("history" not in set(p["group"]) for p in data.train_partitions)
