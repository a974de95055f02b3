"""Federated partitions: IID, Dirichlet label skew and whole groups."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import datasets
import numpy as np
import pytest

from fedtune.data.partition import partition_dataset


def _positive_share(parts: list[datasets.Dataset]) -> np.ndarray:
    return np.array([Counter(p["label"])["positive"] / len(p) for p in parts])


def test_iid_sizes_and_coverage(reviews_task_small: datasets.Dataset) -> None:
    parts = partition_dataset(reviews_task_small, num_partitions=3, scheme="iid", seed=0)
    assert [len(p) for p in parts] == [67, 67, 66]
    all_prompts = [x for p in parts for x in p["prompt"]]
    assert sorted(all_prompts) == sorted(reviews_task_small["prompt"])


def test_partitions_are_deterministic(reviews_task_small: datasets.Dataset) -> None:
    for scheme in ("iid", "dirichlet", "group"):
        a = partition_dataset(reviews_task_small, num_partitions=4, scheme=scheme, seed=7)
        b = partition_dataset(reviews_task_small, num_partitions=4, scheme=scheme, seed=7)
        c = partition_dataset(reviews_task_small, num_partitions=4, scheme=scheme, seed=8)
        assert [p["prompt"] for p in a] == [p["prompt"] for p in b], scheme
        assert [p["prompt"] for p in a] != [p["prompt"] for p in c], scheme


def test_dirichlet_skews_labels_more_than_iid(reviews_task_small: datasets.Dataset) -> None:
    iid = partition_dataset(reviews_task_small, num_partitions=4, scheme="iid", seed=0)
    skew = partition_dataset(reviews_task_small, num_partitions=4, scheme="dirichlet", seed=0, alpha=0.1)
    assert sum(len(p) for p in skew) == len(reviews_task_small)
    assert all(len(p) >= 1 for p in skew)
    assert _positive_share(skew).std() > 2 * _positive_share(iid).std()


def test_group_keeps_each_group_in_one_partition() -> None:
    ds = datasets.Dataset.from_dict(
        {
            "prompt": [str(i) for i in range(60)],
            "answer": ["a"] * 60,
            "label": ["x"] * 60,
            "group": [f"g{i % 7}" for i in range(60)],
        }
    )
    parts = partition_dataset(ds, num_partitions=3, scheme="group", seed=0)
    owners: dict[str, set[int]] = {}
    for i, p in enumerate(parts):
        for g in p["group"]:
            owners.setdefault(g, set()).add(i)
    assert all(len(o) == 1 for o in owners.values())
    assert len(owners) == 7
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 9  # balanced by size


def test_group_on_real_movies(reviews_task_small: datasets.Dataset) -> None:
    parts = partition_dataset(reviews_task_small, num_partitions=5, scheme="group", seed=0)
    movies = [set(p["group"]) for p in parts]
    assert all(not (a & b) for i, a in enumerate(movies) for b in movies[i + 1 :])
    assert sum(len(p) for p in parts) == len(reviews_task_small)


def test_validation(reviews_task_small: datasets.Dataset) -> None:
    with pytest.raises(ValueError, match="iid, dirichlet, group"):
        partition_dataset(reviews_task_small, num_partitions=2, scheme="shards", seed=0)
    for n in (0, 201):
        with pytest.raises(ValueError, match="num_partitions"):
            partition_dataset(reviews_task_small, num_partitions=n, scheme="iid", seed=0)
    with pytest.raises(ValueError, match="alpha"):
        partition_dataset(reviews_task_small, num_partitions=2, scheme="dirichlet", seed=0, alpha=0.0)
    no_group = reviews_task_small.remove_columns("group")
    with pytest.raises(ValueError, match="'group' column"):
        partition_dataset(no_group, num_partitions=2, scheme="group", seed=0)


def test_too_few_groups_or_too_much_skew() -> None:
    ds = datasets.Dataset.from_dict(
        {
            "prompt": [str(i) for i in range(20)],
            "answer": ["a"] * 20,
            "label": ["p", "n"] * 10,
            "group": ["g"] * 20,
        }
    )
    with pytest.raises(ValueError, match="lower num_partitions"):
        partition_dataset(ds, num_partitions=2, scheme="group", seed=0)
    with pytest.raises(ValueError, match="raise alpha"):
        partition_dataset(ds, num_partitions=20, scheme="dirichlet", seed=0, alpha=0.01, min_partition_size=1)


def test_partitioning_does_not_import_flwr() -> None:
    code = (
        "import sys, datasets\n"
        "from fedtune.data.partition import partition_dataset\n"
        "ds = datasets.Dataset.from_dict({'label': ['a', 'b'] * 5, 'group': list('abcdeabcde')})\n"
        "for s in ('iid', 'dirichlet', 'group'):\n"
        "    partition_dataset(ds, num_partitions=2, scheme=s, seed=0)\n"
        "print('flwr' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
