"""PrivacyLedger: opacus' epsilons, the worst unit, target-epsilon, and the checkpoint round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedtune.privacy import PrivacyLedger, noise_multiplier_for


def test_rdp_matches_opacus_and_prv_is_tighter_but_close() -> None:
    ledger = PrivacyLedger("rdp")
    for _ in range(10):
        ledger.record(0, noise_multiplier=1.0, sample_rate=0.01, steps=100)
    ref = RDPAccountant()
    ref.history = [(1.0, 0.01, 1000)]
    rdp = ledger.epsilon(1e-5)
    assert rdp == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    prv = ledger.epsilon(1e-5, accountant="prv")
    assert 0.5 * rdp <= prv <= rdp * 1.05
    report = ledger.report(1e-5)
    assert report["epsilon"] == report["epsilon_rdp"] == pytest.approx(rdp)
    assert report["epsilon_prv"] == pytest.approx(prv, rel=0.02)


def test_the_reported_epsilon_is_the_worst_units() -> None:
    ledger = PrivacyLedger()
    ledger.record(1, noise_multiplier=2.0, sample_rate=0.01, steps=50)
    ledger.record(2, noise_multiplier=0.8, sample_rate=0.1, steps=50)
    alone = PrivacyLedger()
    alone.record(2, noise_multiplier=0.8, sample_rate=0.1, steps=50)
    assert ledger.epsilon(1e-5) == pytest.approx(alone.epsilon(1e-5))
    assert PrivacyLedger().epsilon(1e-5) == 0.0


def test_target_epsilon_gives_a_sigma_that_meets_it() -> None:
    for accountant in ("rdp", "prv"):
        sigma = noise_multiplier_for(3.0, 1e-5, sample_rate=0.05, steps=200, accountant=accountant)
        ledger = PrivacyLedger(accountant)
        ledger.record(0, noise_multiplier=sigma, sample_rate=0.05, steps=200)
        assert 2.5 < ledger.epsilon(1e-5) <= 3.0 + 0.05


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(0.0, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, 0), (float("nan"), 0.1, 1)],
)
def test_invalid_records_are_refused(sigma: float, q: float, steps: int) -> None:
    with pytest.raises(ValueError):
        PrivacyLedger().record(0, noise_multiplier=sigma, sample_rate=q, steps=steps)


def test_state_round_trips_through_npz_and_bad_states_change_nothing() -> None:
    ledger = PrivacyLedger("prv")
    ledger.record(3, noise_multiplier=1.1, sample_rate=0.02, steps=30)
    ledger.record(3, noise_multiplier=1.1, sample_rate=0.02, steps=30)  # merges
    ledger.record(-1, noise_multiplier=0.9, sample_rate=0.3, steps=1)
    state = ledger.state_dict()
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    buf.seek(0)
    with np.load(buf) as z:
        loaded = {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
    back = PrivacyLedger("prv")
    back.load_state_dict(loaded)
    assert back.histories == ledger.histories == {3: [(1.1, 0.02, 60)], -1: [(0.9, 0.3, 1)]}
    assert back.report(1e-5) == ledger.report(1e-5)
    for bad in ({**state, "version": 9}, {**state, "accountant": "rdp"}, {**state, "steps": np.zeros(1)}):
        with pytest.raises(ValueError):
            back.load_state_dict(bad)
    assert back.histories == ledger.histories


def test_report_is_cheap_for_200_clients_of_40_rounds() -> None:
    """Each client its own q (batch / its examples): the RDP curves are paid for when recorded."""
    import time

    ledger = PrivacyLedger("rdp")
    for _ in range(40):
        for unit in range(200):
            ledger.record(unit, noise_multiplier=1.0, sample_rate=8 / (100 + unit), steps=10)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        report = ledger.report(1e-5)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.5, times  # ~0.2 s the first time (one PRV), ~5 ms once cached
    worst = PrivacyLedger()
    worst.record(0, noise_multiplier=1.0, sample_rate=8 / 100, steps=400)  # the smallest client
    assert report["epsilon"] == report["epsilon_rdp"] == pytest.approx(worst.epsilon(1e-5), rel=1e-9)
    assert report["epsilon_prv"] == pytest.approx(worst.epsilon(1e-5, accountant="prv"), rel=1e-9)


def test_prv_epsilon_is_the_maximum_over_units() -> None:
    ledger = PrivacyLedger("prv")
    ledger.record(1, noise_multiplier=1.0, sample_rate=0.02, steps=50)
    ledger.record(2, noise_multiplier=1.0, sample_rate=0.05, steps=50)
    alone = PrivacyLedger("prv")
    alone.record(2, noise_multiplier=1.0, sample_rate=0.05, steps=50)
    assert ledger.epsilon(1e-5) == pytest.approx(alone.epsilon(1e-5))
    assert ledger.report(1e-5)["epsilon"] == ledger.report(1e-5)["epsilon_prv"] == ledger.epsilon(1e-5)


def test_a_corrupt_state_is_refused_and_changes_nothing() -> None:
    ledger = PrivacyLedger()
    ledger.record(0, noise_multiplier=1.0, sample_rate=0.1, steps=3)
    state = ledger.state_dict()
    before = {k: list(v) for k, v in ledger.histories.items()}
    for bad in (
        {k: v for k, v in state.items() if k != "sigma"},  # a column missing
        {**state, "sample_rate": np.array([float("nan")])},  # an impossible rate
        {**state, "sample_rate": np.array([0.1, 0.2])},  # lengths disagree
        {**state, "version": 2},
    ):
        with pytest.raises(ValueError):
            ledger.load_state_dict(bad)
        assert ledger.histories == before
    with pytest.raises(ValueError):
        noise_multiplier_for(0.0, 1e-5, sample_rate=0.1, steps=10, accountant="rdp")
    with pytest.raises(ValueError):
        PrivacyLedger("gdp")
