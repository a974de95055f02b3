"""Hand-computed Krum scores and selections, ties and the n > 2f + 2 rule."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.aggregators import ClientUpdate, Krum, MultiKrum, UpdateBatch
from fedtune.aggregators.conformance import lora_like_updates
from fedtune.aggregators.krum import krum_scores

# value -> node_id, chosen so that node_id order differs from value order.
NODES = {0.0: 50, 1.0: 20, 3.0: 30, 4.0: 40, 100.0: 10}


def _updates(order: list[float]) -> list[ClientUpdate]:
    return [
        ClientUpdate(node_id=NODES[v], num_examples=1, arrays={"x": np.array([v], dtype=np.float32)})
        for v in order
    ]


def test_krum_scores_by_hand() -> None:
    # f = 1, n = 5 -> each score sums the 2 smallest squared distances to the others.
    batch = UpdateBatch(_updates([0.0, 1.0, 3.0, 4.0, 100.0]), aggregator="krum", server_round=1)
    by_node = dict(zip(batch.node_ids, krum_scores(batch, 1), strict=True))
    # Scores come from a Gram matrix: exact to float64 rounding; the ranking is exact (test below).
    assert by_node == pytest.approx({50: 10.0, 20: 5.0, 30: 5.0, 40: 10.0, 10: 96.0**2 + 97.0**2}, rel=1e-12)


@pytest.mark.parametrize(
    "order", [[0.0, 1.0, 3.0, 4.0, 100.0], [100.0, 4.0, 3.0, 1.0, 0.0], [3.0, 100.0, 0.0, 4.0, 1.0]]
)
def test_krum_breaks_ties_by_node_id_whatever_the_order(order: list[float]) -> None:
    out = Krum(num_byzantine=1).aggregate(1, _updates(order))
    assert out.arrays["x"].tolist() == [1.0]  # nodes 20 and 30 tie at 5; node 20 wins
    assert out.num_clients == 5


@pytest.mark.parametrize("order", [[0.0, 1.0, 3.0, 4.0, 100.0], [4.0, 0.0, 100.0, 1.0, 3.0]])
def test_multi_krum_selects_m_best(order: list[float]) -> None:
    # Ranking: 1 (node 20), 3 (node 30), then 0 (node 50) and 4 (node 40) tie at 10 -> node 40 first.
    out = MultiKrum(num_byzantine=1, krum_select=3).aggregate(1, _updates(order))
    np.testing.assert_allclose(out.arrays["x"], [(1.0 + 3.0 + 4.0) / 3], rtol=1e-7)
    default = MultiKrum(num_byzantine=1).aggregate(1, _updates(order))  # m = n - f = 4
    np.testing.assert_allclose(default.arrays["x"], [(0.0 + 1.0 + 3.0 + 4.0) / 4], rtol=1e-7)


def test_multi_krum_is_unweighted() -> None:
    updates = [
        ClientUpdate(node_id=i, num_examples=10**i, arrays={"x": np.array([v], np.float32)})
        for i, v in enumerate([0.0, 1.0, 2.0, 50.0])
    ]
    out = MultiKrum(num_byzantine=0, krum_select=2).aggregate(1, updates)
    # 2 neighbours each: scores 0: 1+4, 1: 1+1, 2: 1+4, 50: huge -> picks 1, then 0 (node 0 < node 2).
    # Unweighted mean 0.5; weighting by num_examples (1 and 10) would give 10/11.
    np.testing.assert_allclose(out.arrays["x"], [0.5])


def test_krum_picks_an_honest_update_over_a_scaled_attacker() -> None:
    honest = lora_like_updates(6, index=3)
    victim = honest[0]
    attacker = ClientUpdate(
        node_id=-1, num_examples=10_000, arrays={k: v * np.float32(100) for k, v in victim.arrays.items()}
    )
    out = Krum(num_byzantine=1).aggregate(1, [*honest, attacker])
    matches = [u.node_id for u in honest if all(np.array_equal(out.arrays[k], u.arrays[k]) for k in u.arrays)]
    assert len(matches) == 1
    assert not np.array_equal(out.arrays[next(iter(victim.arrays))], next(iter(attacker.arrays.values())))


@pytest.mark.parametrize(("f", "n"), [(0, 2), (1, 4), (2, 6)])
def test_krum_requires_n_above_2f_plus_2(f: int, n: int) -> None:
    updates = lora_like_updates(n)
    for agg in (Krum(num_byzantine=f), MultiKrum(num_byzantine=f)):
        assert agg.min_clients == 2 * f + 3
        with pytest.raises(ValueError, match=rf"n > 2f \+ 2 updates, got n={n} with f={f}"):
            agg.aggregate(1, updates)
        agg.aggregate(1, lora_like_updates(n + 1))  # one more is enough


def test_multi_krum_rejects_selecting_more_than_n_minus_f() -> None:
    agg = MultiKrum(num_byzantine=1, krum_select=5)
    assert agg.min_clients == 6
    with pytest.raises(ValueError, match=r"krum_select=5 exceeds n - f = 5 - 1"):
        agg.aggregate(1, lora_like_updates(5))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_krum_options_are_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="num_byzantine"):
        Krum(num_byzantine=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="krum_select"):
        MultiKrum(krum_select=bad)  # type: ignore[arg-type]


def _exact_scores(vectors: np.ndarray, f: int) -> np.ndarray:
    """Krum from explicit differences, the definition the Gram-matrix path must reproduce."""
    n = len(vectors)
    diffs = vectors[:, None, :].astype(np.float64) - vectors[None, :, :].astype(np.float64)
    dist = np.einsum("ijk,ijk->ij", diffs, diffs)
    return np.array([np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(n)])


@pytest.mark.parametrize("offset", [0.0, 1e4])  # a large common offset makes the Gram path cancel
def test_gram_scores_rank_like_exact_differences_with_ties(offset: float) -> None:
    rng = np.random.Generator(np.random.PCG64(3))
    vectors = (offset + rng.normal(size=(30, 257))).astype(np.float32)
    vectors[7] = vectors[3]  # exact duplicates tie exactly; ties go to the lower node id
    vectors[20] = vectors[3]
    vectors[11] = vectors[12] + np.float32(1e-3)  # nearly tied
    updates = [ClientUpdate(node_id=100 - i, num_examples=1, arrays={"x": v}) for i, v in enumerate(vectors)]
    batch = UpdateBatch(updates, aggregator="krum", server_round=1)
    ordered = np.stack([u.arrays["x"] for u in batch.updates])
    exact = _exact_scores(ordered, 2)
    ours = krum_scores(batch, 2)
    np.testing.assert_allclose(ours, exact, rtol=1e-9)
    assert list(np.argsort(ours, kind="stable")) == list(np.argsort(exact, kind="stable"))
