"""Conformance checks every aggregator should pass, for fedtune's tests and for your own.

Run ``check_aggregator(lambda: MyAggregator(...))`` in a test (like scikit-learn's
``check_estimator``). Each ``check_*`` takes a zero-argument factory, because stateful
aggregators must be compared from fresh instances, and raises ``AssertionError`` naming the
broken property. Test data is synthetic, shaped like FedKSeed (one sparse length-K
``"coefficients"`` vector) and LoRA-FedAvg (several small 2-D adapter arrays).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import NoReturn

import numpy as np

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate

AggregatorFactory = Callable[[], Aggregator]

_TAG = 0xA66C0F  # keeps conformance generators apart from every other SeedSequence in fedtune
_FEDKSEED, _LORA, _PERMUTE = 1, 2, 3
_LORA_SHAPES: Mapping[str, tuple[int, int]] = {
    "layers.0.self_attn.q_proj.lora_A": (4, 16),
    "layers.0.self_attn.q_proj.lora_B": (16, 4),
    "layers.1.self_attn.v_proj.lora_A": (4, 16),
    "layers.1.self_attn.v_proj.lora_B": (16, 4),
}


def _rng(purpose: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_TAG, purpose, index]))


def _node_ids(rng: np.random.Generator, num_clients: int) -> list[int]:
    return [int(i) for i in rng.choice(10_000, size=num_clients, replace=False)]


def fedkseed_like_updates(
    num_clients: int, *, num_seeds: int = 256, seeds_per_client: int = 8, index: int = 0
) -> list[ClientUpdate]:
    """Sparse ``"coefficients"`` vectors: each client touches ``seeds_per_client`` of ``num_seeds``."""
    rng = _rng(_FEDKSEED, index)
    updates = []
    for node_id in _node_ids(rng, num_clients):
        coeffs = np.zeros(num_seeds, dtype=np.float32)
        touched = rng.choice(num_seeds, size=seeds_per_client, replace=False)
        coeffs[touched] = rng.normal(0.0, 1e-2, size=seeds_per_client).astype(np.float32)
        updates.append(
            ClientUpdate(
                node_id=node_id, num_examples=int(rng.integers(1, 100)), arrays={"coefficients": coeffs}
            )
        )
    return updates


def lora_like_updates(num_clients: int, *, index: int = 0) -> list[ClientUpdate]:
    """Several small adapter deltas per client (values ~1e-2, whole-update norm ~0.1)."""
    rng = _rng(_LORA, index)
    return [
        ClientUpdate(
            node_id=node_id,
            num_examples=int(rng.integers(1, 100)),
            arrays={
                name: rng.normal(0.0, 1e-2, size=shape).astype(np.float32)
                for name, shape in _LORA_SHAPES.items()
            },
        )
        for node_id in _node_ids(rng, num_clients)
    ]


def _cohort_size(agg: Aggregator) -> int:
    return max(6, agg.min_clients + 2)


def _fail(message: str) -> NoReturn:
    raise AssertionError(message)


def _expect_value_error(call: Callable[[], object], what: str, *, mentions: tuple[str, ...] = ()) -> None:
    try:
        call()
    except ValueError as exc:
        missing = [m for m in mentions if m not in str(exc)]
        if missing:
            _fail(f"{what}: ValueError message {str(exc)!r} should mention {missing}")
        return
    except Exception as exc:
        raise AssertionError(f"{what}: raised {type(exc).__name__} ({exc}) instead of ValueError") from exc
    _fail(f"{what}: no ValueError raised")


def _check_shaped_like(out: GlobalUpdate, updates: list[ClientUpdate], what: str) -> None:
    if not isinstance(out, GlobalUpdate):
        _fail(f"{what}: aggregate returned {type(out).__name__}, not GlobalUpdate")
    ref = updates[0].arrays
    if set(out.arrays) != set(ref):
        _fail(f"{what}: output arrays {sorted(out.arrays)} differ from input arrays {sorted(ref)}")
    for name, arr in ref.items():
        if out.arrays[name].shape != arr.shape or out.arrays[name].dtype != np.float32:
            _fail(
                f"{what}: {name!r} is {out.arrays[name].dtype}{out.arrays[name].shape}, "
                f"expected float32{arr.shape}"
            )
    if out.num_clients != len(updates):
        _fail(
            f"{what}: num_clients={out.num_clients}, expected {len(updates)} (the number of updates received)"
        )


def _check_identical(a: GlobalUpdate, b: GlobalUpdate, what: str) -> None:
    if set(a.arrays) != set(b.arrays) or a.num_clients != b.num_clients:
        _fail(f"{what}: results differ in array names or num_clients")
    for name in a.arrays:
        if not np.array_equal(a.arrays[name], b.arrays[name]):
            gap = float(np.max(np.abs(a.arrays[name].astype(np.float64) - b.arrays[name])))
            _fail(
                f"{what}: array {name!r} differs (max abs difference {gap:.3g}); "
                "results must be bit-identical"
            )


def check_rejects_empty(factory: AggregatorFactory) -> None:
    """An empty round raises ``ValueError`` mentioning "no updates"."""
    agg = factory()
    _expect_value_error(lambda: agg.aggregate(1, []), "empty round", mentions=("no updates",))


def check_min_clients(factory: AggregatorFactory) -> None:
    """``min_clients`` updates are accepted and one fewer is rejected with ``ValueError``."""
    agg = factory()
    n = agg.min_clients
    if n < 1:
        _fail(f"min_clients must be >= 1, got {n}")
    updates = lora_like_updates(n, index=10)
    _check_shaped_like(factory().aggregate(1, updates), updates, f"{n} (= min_clients) updates")
    if n > 1:
        _expect_value_error(lambda: factory().aggregate(1, updates[:-1]), f"{n - 1} (< min_clients) updates")


def check_single_client(factory: AggregatorFactory, *, expect_identity: bool = True) -> None:
    """One client: rejected if ``min_clients > 1``, else (by default) returns that client's arrays."""
    agg = factory()
    update = lora_like_updates(1, index=11)
    if agg.min_clients > 1:
        _expect_value_error(lambda: agg.aggregate(1, update), "one client with min_clients > 1")
        return
    out = agg.aggregate(1, update)
    _check_shaped_like(out, update, "one client")
    if expect_identity:
        _check_identical(out, GlobalUpdate(arrays=update[0].arrays, num_clients=1), "one client")


def check_permutation_invariance(factory: AggregatorFactory) -> None:
    """Any order of the updates gives a bit-identical result (call only if the class claims it)."""
    n = _cohort_size(factory())
    rounds = [first for first, _ in _sequences(factory, with_duplicate=True)] + [_cancellation_round(n)]
    for index, updates in enumerate(rounds):
        reference = factory().aggregate(1, updates)
        rng = _rng(_PERMUTE, index)
        for _ in range(4):
            shuffled = [updates[int(i)] for i in rng.permutation(len(updates))]
            _check_identical(reference, factory().aggregate(1, shuffled), "permuted updates")


def check_determinism(factory: AggregatorFactory) -> None:
    """Two fresh instances fed the same rounds give bit-identical results."""
    for rounds in _sequences(factory):
        first, second = factory(), factory()
        for server_round, updates in enumerate(rounds, start=1):
            a, b = first.aggregate(server_round, updates), second.aggregate(server_round, updates)
            _check_identical(a, b, f"same input, round {server_round}")


def check_state_round_trip(factory: AggregatorFactory) -> None:
    """State saved after a round, loaded into a fresh instance, reproduces the next round exactly."""
    for round1, round2 in _sequences(factory):
        original = factory()
        original.aggregate(1, round1)
        state = original.state_dict()
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            _fail(f"state_dict must return a dict with str keys, got {state!r}")
        expected = original.aggregate(2, round2)  # a state aliasing live buffers would drift here
        restored = factory()
        restored.load_state_dict(state)
        _check_identical(expected, restored.aggregate(2, round2), "restored from state_dict")
        if not state:
            _expect_value_error(
                lambda: factory().load_state_dict({"bogus": 1}), "stateless load of unknown keys"
            )


def check_rejects_mismatched(factory: AggregatorFactory) -> None:
    """A client whose names or shapes differ raises ``ValueError`` naming the node and the array."""
    agg = factory()
    good = lora_like_updates(_cohort_size(agg), index=12)
    odd_name = "layers.0.self_attn.q_proj.lora_A"
    template = dict(good[-1].arrays)
    without = {k: v for k, v in template.items() if k != odd_name}
    reshaped = {**template, odd_name: np.zeros((5, 16), dtype=np.float32)}
    extra = {**template, "layers.9.extra": np.zeros(3, dtype=np.float32)}
    cases = {
        "missing array": (without, odd_name),
        "wrong shape": (reshaped, odd_name),
        "extra array": (extra, "layers.9.extra"),
    }
    for what, (arrays, name) in cases.items():
        bad = [*good[:-1], ClientUpdate(node_id=424242, num_examples=3, arrays=arrays)]
        _expect_value_error(partial(factory().aggregate, 1, bad), what, mentions=("424242", name))


def check_fedkseed_like(factory: AggregatorFactory) -> None:
    """Aggregates sparse FedKSeed-like coefficient vectors into a finite float32 vector of length K."""
    updates = fedkseed_like_updates(_cohort_size(factory()), index=13)
    _check_shaped_like(factory().aggregate(1, updates), updates, "FedKSeed-like updates")


def check_lora_like(factory: AggregatorFactory) -> None:
    """Aggregates multi-array LoRA-like updates array by array."""
    updates = lora_like_updates(_cohort_size(factory()), index=14)
    _check_shaped_like(factory().aggregate(1, updates), updates, "LoRA-like updates")


def _sequences(
    factory: AggregatorFactory, *, with_duplicate: bool = False
) -> list[tuple[list[ClientUpdate], list[ClientUpdate]]]:
    """Two-round runs of test data, one FedKSeed-like and one LoRA-like (same arrays every round).

    With ``with_duplicate`` two nodes send equal updates, a tie only ``node_id`` order can break.
    """
    n = _cohort_size(factory())
    runs = [
        (fedkseed_like_updates(n, index=20), fedkseed_like_updates(n, index=21)),
        (lora_like_updates(n, index=22), lora_like_updates(n, index=23)),
    ]
    if with_duplicate:
        for updates, _ in runs:
            twin = updates[0]
            updates[1] = ClientUpdate(
                node_id=updates[1].node_id, num_examples=twin.num_examples, arrays=twin.arrays
            )
    return runs


def _cancellation_round(num_clients: int) -> list[ClientUpdate]:
    """Equal weights and +-1e20 next to 1.0 in one coordinate: float sums then depend on the order."""
    updates = fedkseed_like_updates(num_clients, index=24)
    spikes = [1e20, -1e20, 1.0]
    out = []
    for i, upd in enumerate(updates):
        coeffs = np.array(upd.arrays["coefficients"])
        if i < len(spikes):
            coeffs[0] = spikes[i]
        out.append(ClientUpdate(node_id=upd.node_id, num_examples=1, arrays={"coefficients": coeffs}))
    return out


ALL_CHECKS: tuple[Callable[[AggregatorFactory], None], ...] = (
    check_rejects_empty,
    check_min_clients,
    check_single_client,
    check_permutation_invariance,
    check_determinism,
    check_state_round_trip,
    check_rejects_mismatched,
    check_fedkseed_like,
    check_lora_like,
)


def check_aggregator(factory: AggregatorFactory, *, expect_single_client_identity: bool = True) -> None:
    """Run every check; permutation invariance only when the class claims it."""
    claims_invariance = factory().permutation_invariant
    for check in ALL_CHECKS:
        if check is check_permutation_invariance and not claims_invariance:
            continue
        if check is check_single_client:
            check_single_client(factory, expect_identity=expect_single_client_identity)
        else:
            check(factory)
