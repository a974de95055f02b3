"""Every registered aggregator against the conformance suite, plus proof the suite can fail."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import pytest

from fedtune.aggregators import (
    AGGREGATORS,
    Aggregator,
    ClientUpdate,
    GlobalUpdate,
    UpdateBatch,
    available_aggregators,
    create_aggregator,
)
from fedtune.aggregators import conformance as conf
from fedtune.aggregators.base import StateValue

# Two option sets so both Krum regimes (f = 0 and f = 1) and both clipping modes (adaptive, fixed)
# run through every check; each aggregator gets the options it declares (unknown ones are errors).
OPTION_SETS: dict[str, dict[str, float | int]] = {
    "adaptive-f1": {"trim-fraction": 0.2, "num-byzantine": 1, "clip-norm": 0.0, "krum-select": 0},
    "fixed-f0": {"trim-fraction": 0.0, "num-byzantine": 0, "clip-norm": 0.5, "krum-select": 2},
}
# Registered aggregators that do NOT return a lone client's update unchanged (none today).
NO_SINGLE_CLIENT_IDENTITY: frozenset[str] = frozenset()

CHECKS = {check.__name__: check for check in conf.ALL_CHECKS}


def _factory(name: str, options: dict[str, float | int]) -> conf.AggregatorFactory:
    accepted = AGGREGATORS.options_of(name)
    own = {key: value for key, value in options.items() if key in accepted}
    return lambda: create_aggregator(name, own)


@pytest.mark.parametrize("check_name", sorted(CHECKS))
@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
@pytest.mark.parametrize("name", available_aggregators())
def test_registered_aggregator_conforms(name: str, option_set: str, check_name: str) -> None:
    # Prepare
    factory = _factory(name, OPTION_SETS[option_set])
    check = CHECKS[check_name]
    # Execute / Assert
    if check is conf.check_permutation_invariance and not factory().permutation_invariant:
        pytest.skip(f"{name} does not claim permutation invariance")
    if check is conf.check_single_client:
        conf.check_single_client(factory, expect_identity=name not in NO_SINGLE_CLIENT_IDENTITY)
    else:
        check(factory)


def test_builtins_claim_permutation_invariance() -> None:
    for name in available_aggregators():
        assert create_aggregator(name).permutation_invariant, name


def test_single_krum_client_is_rejected_with_the_rule() -> None:
    lone = conf.lora_like_updates(1)
    for name in ("krum", "multi-krum"):
        agg = create_aggregator(name, {"num-byzantine": 0})
        assert agg.min_clients == 3
        with pytest.raises(ValueError, match=r"n > 2f \+ 2.*n=1 with f=0.*at least 3 clients"):
            agg.aggregate(1, lone)


# --- the suite must be able to fail: deliberately broken aggregators ---------------------------


class _FirstWins(Aggregator):
    """Claims invariance but returns whichever update arrived first."""

    permutation_invariant: ClassVar[bool] = True

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        UpdateBatch(updates, aggregator="first-wins", server_round=server_round)
        return GlobalUpdate(arrays=updates[0].arrays, num_clients=len(updates))


class _Unchecked(Aggregator):
    """Skips validation entirely."""

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        return GlobalUpdate(arrays=updates[-1].arrays, num_clients=len(updates))


class _Momentum(Aggregator):
    """Server momentum on the unweighted mean; ``save`` controls whether the state is kept."""

    save = True

    def __init__(self) -> None:
        self._velocity: dict[str, np.ndarray] = {}

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        batch = UpdateBatch(updates, aggregator="momentum", server_round=server_round)
        for name in batch.names:
            mean = batch.stack(name).mean(axis=0)
            self._velocity[name] = 0.9 * self._velocity.get(name, np.zeros_like(mean)) + mean
        return batch.to_global(self._velocity)

    def state_dict(self) -> dict[str, StateValue]:
        return {f"velocity/{k}": v.copy() for k, v in self._velocity.items()} if self.save else {}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        self._velocity = {
            k.removeprefix("velocity/"): np.array(v, dtype=np.float64) for k, v in state.items()
        }


class _ForgetfulMomentum(_Momentum):
    save = False


class _Flaky(Aggregator):
    """Output depends on how many instances exist."""

    instances = 0

    def __init__(self) -> None:
        type(self).instances += 1
        self._offset = float(type(self).instances)

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        batch = UpdateBatch(updates, aggregator="flaky", server_round=server_round)
        return batch.to_global({n: batch.stack(n).mean(axis=0) + self._offset for n in batch.names})


class _Overpromising(_Momentum):
    """Says it needs 3 clients but silently accepts fewer."""

    @property
    def min_clients(self) -> int:
        return 3


@pytest.mark.parametrize(
    ("aggregator", "check"),
    [
        (_FirstWins, conf.check_permutation_invariance),
        (_Unchecked, conf.check_rejects_empty),
        (_Unchecked, conf.check_rejects_mismatched),
        (_ForgetfulMomentum, conf.check_state_round_trip),
        (_Flaky, conf.check_determinism),
        (_Overpromising, conf.check_min_clients),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_suite_catches_broken_aggregator(
    aggregator: type[Aggregator], check: Callable[[conf.AggregatorFactory], None]
) -> None:
    with pytest.raises(AssertionError):
        check(aggregator)


def test_suite_accepts_stateful_aggregator_that_saves_its_state() -> None:
    conf.check_state_round_trip(_Momentum)
    conf.check_determinism(_Momentum)
