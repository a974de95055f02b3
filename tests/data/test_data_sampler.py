"""Deterministic, optionally class-balanced minibatch sampling."""

from __future__ import annotations

from collections import Counter

import pytest

from fedtune.data.sampler import BatchSampler


def _draw(sampler: BatchSampler, n: int) -> list[list[int]]:
    return [sampler.next_indices() for _ in range(n)]


def test_same_key_same_stream_other_key_other_stream() -> None:
    a = _draw(BatchSampler(num_examples=50, batch_size=8, key=(1, 2, 3)), 10)
    b = _draw(BatchSampler(num_examples=50, batch_size=8, key=(1, 2, 3)), 10)
    c = _draw(BatchSampler(num_examples=50, batch_size=8, key=(1, 2, 4)), 10)
    d = _draw(BatchSampler(num_examples=50, batch_size=8, key=(1, 23)), 10)  # not a concatenation clash
    assert a == b
    assert a != c and a != d


def test_epochs_cover_every_example_once() -> None:
    sampler = BatchSampler(num_examples=12, batch_size=4, key=(0,))
    epoch = [i for batch in _draw(sampler, 3) for i in batch]
    assert sorted(epoch) == list(range(12))
    assert all(len(set(b)) == len(b) for b in _draw(sampler, 20))  # no repeats inside a batch


def test_uneven_epochs_never_repeat_inside_a_batch() -> None:
    sampler = BatchSampler(num_examples=10, batch_size=4, key=(0, 1, 2))
    batches = _draw(sampler, 30)
    assert all(len(set(b)) == 4 for b in batches)
    assert Counter(i for b in batches for i in b) == Counter({i: 12 for i in range(10)})


def test_balanced_batches_with_skewed_labels() -> None:
    # Prepare: 90% "pos", 10% "neg".
    labels = ["pos"] * 90 + ["neg"] * 10
    sampler = BatchSampler(num_examples=100, batch_size=8, key=(7, 0, 1), labels=labels)
    # Execute
    batches = _draw(sampler, 25)
    # Assert: each batch is half and half; each class cycles through all its rows before repeating.
    for batch in batches:
        assert Counter(labels[i] for i in batch) == {"pos": 4, "neg": 4}
    negs = [i for b in batches for i in b if labels[i] == "neg"]
    assert sorted(negs[:10]) == list(range(90, 100))
    assert sampler.num_classes == 2


def test_round_robin_carries_over_between_batches() -> None:
    labels = ["a", "b", "c"] * 10
    sampler = BatchSampler(num_examples=30, batch_size=4, key=(0,), labels=labels)
    counts = Counter(labels[i] for b in _draw(sampler, 3) for i in b)
    assert counts == {"a": 4, "b": 4, "c": 4}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": 0, "batch_size": 1, "key": (0,)}, "num_examples"),
        ({"num_examples": 5, "batch_size": 0, "key": (0,)}, "batch_size"),
        ({"num_examples": 5, "batch_size": 1, "key": ()}, "key"),
        ({"num_examples": 5, "batch_size": 1, "key": (-1,)}, "key"),
        ({"num_examples": 5, "batch_size": 1, "key": (0,), "labels": ["a"]}, "labels"),
    ],
)
def test_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchSampler(**kwargs)  # type: ignore[arg-type]
