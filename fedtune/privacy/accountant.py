"""Privacy accounting over a run: opacus' RDP and PRV accountants, one history per unit.

A unit is whoever the guarantee is for: a client (sample-level DP, where each client's data has
its own sample rate and steps) or the whole federation (client-level DP, one unit). Each release
is a sampled Gaussian mechanism (noise multiplier sigma, sample rate q, steps), the same
abstraction DP-SGD uses, so opacus' accountants apply unchanged. The reported epsilon is the
largest over units: the guarantee every unit gets.

The ledger holds only (sigma, q, steps) triples, so its state is a few arrays in the server's
checkpoint and a resumed run reports the same epsilon.

Cost (:meth:`PrivacyLedger.report` runs every round, e.g. 200 clients of 40 rounds each, each
client with its own q = batch / its examples): opacus' ``compute_rdp`` costs ~20-50 ms per (sigma,
q), so the per-step RDP curve of each distinct mechanism is computed once, when it is first
recorded (or loaded), and a unit's RDP is the steps-weighted sum of those curves. PRV (~0.1-0.5 s a
history) is computed in :meth:`~PrivacyLedger.report` only for the unit worst under RDP, and cached
by identical history; :meth:`~PrivacyLedger.epsilon` with ``accountant="prv"`` is the exact maximum
over all units (one PRV per distinct history, cached) for when that matters more than time.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping

import numpy as np

# opacus (and with it its torch extensions) is imported where an epsilon is computed, so a client
# process that only noises its scalars never pays for it (tests/runtime/test_node_imports.py).

ACCOUNTANTS = ("rdp", "prv")
STATE_VERSION = 1
Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
StateValue = np.ndarray | int | float | str | bool


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one release at every order; linear in steps, so a history costs one call per mechanism
    (opacus computes it afresh, ~40 ms each, which for 200 clients a round is seconds)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    out = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1024)
def _prv_epsilon(history: tuple[Entry, ...], delta: float) -> float:
    """opacus' PRV epsilon (its upper bound, eps_error 0.01) of one history; cached by history."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(history)
    try:
        with warnings.catch_warnings():
            # At q = 1 (no subsampling) opacus' PRV takes log(1 - q) = log(0) inside an np.where
            # whose other branch it then uses: the warning is spurious, the result exact.
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(acc.get_epsilon(delta=delta, eps_error=0.01))
    except (ValueError, RuntimeError):  # PRV's domain can fail for extreme settings
        return float("nan")


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return name


def noise_multiplier_for(
    target_epsilon: float, delta: float, *, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest sigma whose ``steps`` releases at rate ``sample_rate`` stay within epsilon."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    _check_entry(1.0, sample_rate, steps)
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # "optimal order is the largest alpha" while searching: harmless
        warnings.simplefilter("ignore", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=_check_accountant(accountant),
            )
        )


def _check_entry(sigma: float, q: float, steps: int) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise multiplier must be > 0, got {sigma}")
    if not (math.isfinite(q) and 0 < q <= 1):
        raise ValueError(f"sample rate must be in (0, 1], got {q}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")


class PrivacyLedger:
    """Per-unit histories of sampled Gaussian mechanisms; epsilon by RDP or PRV (opacus)."""

    def __init__(self, accountant: str = "rdp") -> None:
        self.accountant = _check_accountant(accountant)
        self.histories: dict[int, list[Entry]] = {}

    def record(self, unit: int, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """``steps`` more releases for ``unit``; consecutive equal mechanisms merge, as opacus does."""
        _check_entry(noise_multiplier, sample_rate, steps)
        _rdp_per_step(float(noise_multiplier), float(sample_rate))  # the cost, paid once per mechanism
        history = self.histories.setdefault(int(unit), [])
        if history and history[-1][:2] == (noise_multiplier, sample_rate):
            history[-1] = (noise_multiplier, sample_rate, history[-1][2] + int(steps))
        else:
            history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    @staticmethod
    def _warm(history: list[Entry]) -> None:
        for s, q, _ in history:
            _rdp_per_step(s, q)

    def _rdp_epsilon(self, history: list[Entry], delta: float) -> float:
        rdp = sum(_rdp_per_step(s, q) * n for s, q, n in history)
        with (
            warnings.catch_warnings()
        ):  # "optimal order is the largest alpha": epsilon is then loose, not wrong
            warnings.simplefilter("ignore", UserWarning)
            from opacus.accountants import RDPAccountant
            from opacus.accountants.analysis.rdp import get_privacy_spent

            eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)

    @staticmethod
    def _prv_epsilon(history: list[Entry], delta: float) -> float:
        return _prv_epsilon(tuple(history), delta)

    def epsilon(self, delta: float, *, accountant: str | None = None) -> float:
        """The largest epsilon over units at ``delta`` (0.0 before any release)."""
        which = _check_accountant(accountant or self.accountant)
        if not self.histories:
            return 0.0
        if which == "rdp":
            return max(self._rdp_epsilon(h, delta) for h in self.histories.values())
        distinct = {tuple(h) for h in self.histories.values()}
        return max(_prv_epsilon(h, delta) for h in distinct)

    def report(self, delta: float) -> dict[str, float]:
        """``epsilon`` (the configured accountant), ``epsilon_rdp`` and ``epsilon_prv``.

        ``epsilon_rdp`` is the maximum over units; ``epsilon_prv`` is the PRV epsilon of the unit worst
        under RDP (cached by its history), which is the PRV maximum unless two units are within the
        two accountants' slack of each other; ``epsilon(delta, accountant="prv")`` gives the exact one.
        """
        if not self.histories:
            return {"epsilon": 0.0, "epsilon_rdp": 0.0, "epsilon_prv": 0.0}
        rdp = {u: self._rdp_epsilon(h, delta) for u, h in self.histories.items()}
        worst = max(rdp, key=lambda u: rdp[u])
        prv = self._prv_epsilon(self.histories[worst], delta)
        out = {"epsilon_rdp": rdp[worst], "epsilon_prv": prv}
        return {"epsilon": out[f"epsilon_{self.accountant}"], **out}

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, StateValue]:
        units, sigma, q, steps = [], [], [], []
        for unit in sorted(self.histories):
            for s, r, n in self.histories[unit]:
                units.append(unit)
                sigma.append(s)
                q.append(r)
                steps.append(n)
        return {
            "version": STATE_VERSION,
            "accountant": self.accountant,
            "unit": np.asarray(units, dtype=np.int64),
            "sigma": np.asarray(sigma, dtype=np.float64),
            "sample_rate": np.asarray(q, dtype=np.float64),
            "steps": np.asarray(steps, dtype=np.int64),
        }

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore :meth:`state_dict`; a foreign or corrupt state raises and changes nothing."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"privacy ledger version {state.get('version')!r} is not {STATE_VERSION}; resume with the "
                "fedtune version that wrote the checkpoint"
            )
        if state.get("accountant") != self.accountant:
            raise ValueError(
                f"checkpoint accounted with {state.get('accountant')!r}, this run with {self.accountant!r}"
            )
        try:
            cols = [np.asarray(state[k]) for k in ("unit", "sigma", "sample_rate", "steps")]
        except KeyError as exc:
            raise ValueError(f"privacy ledger state lacks {exc}; the checkpoint is corrupt") from exc
        if len({c.shape for c in cols}) != 1 or cols[0].ndim != 1:
            raise ValueError("privacy ledger arrays disagree in length; the checkpoint is corrupt")
        histories: dict[int, list[Entry]] = {}
        for unit, s, r, n in zip(*(c.tolist() for c in cols), strict=True):
            _check_entry(float(s), float(r), int(n))
            histories.setdefault(int(unit), []).append((float(s), float(r), int(n)))
        for history in histories.values():
            self._warm(history)
        self.histories = histories
