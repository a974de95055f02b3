"""Contributing-token identification: the eta table formula, lookups and validation."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from fedtune.sap.cti import ContributingTokens

# Class 0: token 0 x10, token 1 x2 (12 tokens). Class 1: token 2 x6, token 1 x2, token 3 x1 (9 tokens).
TINY_IDS = [[0] * 6 + [1], [0] * 4 + [1], [2, 2, 2, 1], [2, 2, 2, 1, 3]]
TINY_LABELS = [0, 0, 1, 1]


def fit_tiny(**kwargs: object) -> ContributingTokens:
    options: dict[str, object] = {"num_classes": 2, "vocab_size": 5, "eta_base": 2.0}
    options.update(kwargs)
    return ContributingTokens.fit(TINY_IDS, TINY_LABELS, **options)  # type: ignore[arg-type]


def test_tiny_example_matches_the_formula() -> None:
    table = fit_tiny().table
    xi3 = 3 / 12  # xi = 1 / max(12, 9)
    p0 = [10 / 12, 2 / 12, 0, 0, 0]
    p1 = [0, 2 / 9, 6 / 9, 1 / 9, 0]
    ui0 = [math.log(p0[t] / (p1[t] + xi3)) if p0[t] > 0 else 0.0 for t in range(5)]
    ui1 = [math.log(p1[t] / (p0[t] + xi3)) if p1[t] > 0 else 0.0 for t in range(5)]
    expected = np.array([[max(u, 0.6) * 2.0 for u in ui0], [max(u, 0.6) * 2.0 for u in ui1]])
    np.testing.assert_allclose(table, expected, rtol=1e-12, atol=0)
    # Spelled out: the two class-indicative tokens clear the floor, everything else sits on it.
    assert table[0, 0] == pytest.approx(2 * math.log((10 / 12) / 0.25))
    assert table[1, 2] == pytest.approx(2 * math.log((6 / 9) / 0.25))
    assert np.count_nonzero(table > 1.2 + 1e-12) == 2
    assert table.dtype == np.float64 and table.shape == (2, 5)


def test_three_classes_sum_over_the_other_classes() -> None:
    ids = [[0, 0, 0, 0, 0, 0, 0, 0, 1], [1, 2], [2, 2, 0]]
    cti = ContributingTokens.fit(ids, [0, 1, 2], num_classes=3, vocab_size=3, eta_base=1.0, floor=0.1)
    counts = np.array([[8, 1, 0], [0, 1, 1], [1, 0, 2]], dtype=float)
    p = counts / counts.sum(axis=1, keepdims=True)
    xi = 1 / counts.sum(axis=1).max()
    for c in range(3):
        for t in range(3):
            ui = (
                sum(math.log(p[c, t] / (p[k, t] + 3 * xi)) for k in range(3) if k != c) if counts[c, t] else 0
            )
            assert cti.table[c, t] == pytest.approx(max(ui, 0.1), rel=1e-12)


def test_fit_is_deterministic() -> None:
    a, b = fit_tiny(), fit_tiny()
    assert np.array_equal(a.table, b.table)


def test_class_only_token_beats_shared_token() -> None:
    ids = [[4, 4, 4, 4, 4, 4, 4, 4, 2, 2], [2, 2, 3]] * 3
    cti = ContributingTokens.fit(ids, [1, 0] * 3, num_classes=2, vocab_size=5, eta_base=1.0)
    assert cti.table[1, 4] > cti.table[1, 2]  # 4 only in class 1; 2 equally in both
    assert cti.table[1, 2] == pytest.approx(0.6)


def test_etas_lookup_by_label_and_max_for_unlabeled() -> None:
    cti = fit_tiny()
    ids = torch.tensor([[0, 1, 2, 3, 4], [2, 2, 0, 4, 4]])
    by_label = cti.etas(ids, torch.tensor([0, 1]))
    assert by_label.dtype == torch.float32 and by_label.shape == (2, 5)
    table = torch.from_numpy(np.array(cti.table)).float()
    assert torch.equal(by_label[0], table[0, ids[0]])
    assert torch.equal(by_label[1], table[1, ids[1]])
    unlabeled = cti.etas(ids, None)
    assert torch.equal(unlabeled, table.max(dim=0).values[ids])


def test_ignored_ids_are_not_counted() -> None:
    padded = [[*x, 9, 9, 9] for x in TINY_IDS]  # pad id 9 lies outside the vocabulary
    cti = ContributingTokens.fit(
        padded, TINY_LABELS, num_classes=2, vocab_size=5, eta_base=2.0, ignore_ids={9}
    )
    assert np.array_equal(cti.table, fit_tiny().table)
    with_pad_in_vocab = [[*x, 4, 4] for x in TINY_IDS]
    again = ContributingTokens.fit(
        with_pad_in_vocab, TINY_LABELS, num_classes=2, vocab_size=5, eta_base=2.0, ignore_ids=[4]
    )
    assert np.array_equal(again.table, fit_tiny().table)


def test_a_class_missing_on_this_client_is_allowed() -> None:
    cti = ContributingTokens.fit([[0, 0, 0, 0, 0, 0, 0, 1]], [0], num_classes=3, vocab_size=2, eta_base=1.0)
    assert np.all(cti.table[1:] == 0.6)
    assert cti.table[0, 0] == pytest.approx(2 * math.log((7 / 8) / (3 / 8)))


def test_table_is_read_only_and_validated() -> None:
    cti = fit_tiny()
    with pytest.raises(ValueError):
        cti.table[0, 0] = 1.0
    source = np.ones((2, 3))
    made = ContributingTokens(table=source, eta_base=1.0)
    assert source.flags.writeable  # the caller's array is copied, not frozen
    assert made.num_classes == 2 and made.vocab_size == 3
    with pytest.raises(ValueError, match="2 classes"):
        ContributingTokens(table=np.ones((1, 3)), eta_base=1.0)
    with pytest.raises(ValueError, match="2-D"):
        ContributingTokens(table=np.ones(3), eta_base=1.0)
    with pytest.raises(ValueError, match="> 0"):
        ContributingTokens(table=np.zeros((2, 3)), eta_base=1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"eta_base": 0.0}, "eta_base"),
        ({"eta_base": math.inf}, "eta_base"),
        ({"floor": 0.0}, "floor"),
        ({"vocab_size": 3}, r"token ids must lie in \[0, 3\)"),
    ],
)
def test_bad_fit_arguments_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_tiny(**kwargs)


def test_bad_fit_data_raises() -> None:
    opts: dict[str, float] = {"num_classes": 2, "vocab_size": 5, "eta_base": 1.0}
    with pytest.raises(ValueError, match="4 examples but labels has 3"):
        ContributingTokens.fit(TINY_IDS, TINY_LABELS[:3], **opts)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got 2"):
        ContributingTokens.fit(TINY_IDS, [0, 1, 2, 0], **opts)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got -1"):
        ContributingTokens.fit([[0, -1]], [0], **opts)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must hold ints"):
        ContributingTokens.fit([[0.5]], [0], **opts)  # type: ignore[arg-type, list-item]
    with pytest.raises(ValueError, match="no tokens"):
        ContributingTokens.fit([[], [4]], [0, 1], ignore_ids=[4], **opts)  # type: ignore[arg-type]


def test_bad_etas_arguments_raise() -> None:
    cti = fit_tiny()
    ids = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="input_ids must lie"):
        cti.etas(torch.tensor([[0, 5]]), None)
    with pytest.raises(ValueError, match="labels must be a"):
        cti.etas(ids, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must lie"):
        cti.etas(ids, torch.tensor([2]))
    with pytest.raises(ValueError, match="integer"):
        cti.etas(ids.float(), None)


def test_fit_is_fast_at_realistic_size() -> None:
    gen = np.random.default_rng(0)  # test data only, a local generator
    vocab = 49_152
    ids = [row.tolist() for row in gen.integers(0, vocab, size=(10_000, 64))]
    labels = gen.integers(0, 4, size=10_000).tolist()
    start = time.perf_counter()
    cti = ContributingTokens.fit(ids, labels, num_classes=4, vocab_size=vocab, eta_base=1.0)
    elapsed = time.perf_counter() - start
    assert cti.table.shape == (4, vocab)
    assert elapsed < 2.0  # ~0.1-0.2 s alone; loose because the machine is shared
