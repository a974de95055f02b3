"""What a run's privacy config implies for one release, and the server's ledger of releases.

Every algorithm's client derives the figures of its mechanism here (noise multiplier, sample
rate, releases per round, clip), and its server derives them again from the same config and the
reply's example count, so a reply whose figures differ is rejected instead of trusted. Sigma is
``privacy.noise-multiplier``, or derived from ``privacy.target-epsilon`` over the whole run as if
the unit took part in every round (an upper bound on its releases, so the target holds whatever
the sampling).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

from fedtune.config import PrivacySection, RunConfig
from fedtune.privacy.accountant import PrivacyLedger, StateValue, noise_multiplier_for
from fedtune.privacy.noise import SecureGaussian
from fedtune.wire.dp_report import DPFigures

#: The accounting unit of client-level DP (sample-level units are client ids, all >= 0).
CLIENT_LEVEL_UNIT = -1
#: Where a server's checkpoint holds its ledger.
STATE_PREFIX = "dp"


@functools.lru_cache(maxsize=1024)
def _derived_sigma(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    return noise_multiplier_for(
        target_epsilon, delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )


def noise_multiplier(privacy: PrivacySection, sample_rate: float, run_steps: int) -> float:
    """Sigma for a unit released at ``sample_rate``, at most ``run_steps`` times over the run."""
    if privacy.noise_multiplier > 0:
        return privacy.noise_multiplier
    return _derived_sigma(privacy.target_epsilon, privacy.delta, sample_rate, run_steps, privacy.accountant)


def sample_figures(cfg: RunConfig, *, num_examples: int, local_steps: int, batch_size: int) -> DPFigures:
    """Sample level for one client: q = batch / its examples, one release per local step."""
    if num_examples < 1:
        raise ValueError("a client with no examples cannot train privately")
    q = min(batch_size, num_examples) / num_examples
    sigma = noise_multiplier(cfg.privacy, q, local_steps * cfg.federation.num_rounds)
    return DPFigures(noise_multiplier=sigma, sample_rate=q, steps=local_steps, clip=cfg.privacy.clip)


def client_figures(cfg: RunConfig) -> DPFigures:
    """Client level: q = clients per round / clients, one release per round."""
    fed = cfg.federation
    q = min(1.0, fed.clients_per_round / fed.num_clients)
    sigma = noise_multiplier(cfg.privacy, q, fed.num_rounds)
    return DPFigures(noise_multiplier=sigma, sample_rate=q, steps=1, clip=cfg.privacy.clip)


def client_noise_std(cfg: RunConfig, figures: DPFigures) -> float:
    """Client level: the std each client adds per coordinate (0 when the server adds the noise).

    Each of the m sampled clients adds N(0, (sigma C)^2 / m), so their sum carries sigma C; a client
    that drops out takes its share with it, and the accounted epsilon is then optimistic.
    """
    if cfg.privacy.noise_at != "client":
        return 0.0
    return figures.noise_multiplier * figures.clip / math.sqrt(cfg.federation.clients_per_round)


def figures_mismatch(got: DPFigures, want: DPFigures) -> str | None:
    """Why a reply's DP figures differ from those the config implies (None: they agree)."""
    pairs = (
        ("clip", got.clip, want.clip),
        ("noise multiplier", got.noise_multiplier, want.noise_multiplier),
        ("sample rate", got.sample_rate, want.sample_rate),
        ("steps", float(got.steps), float(want.steps)),
    )
    for name, g, w in pairs:
        if not math.isclose(g, w, rel_tol=1e-6, abs_tol=0.0):
            return f"reports {name} {g:g}, but the run's privacy config implies {w:g}"
    return None


class ServerLedger:
    """A server half's privacy: check each reply's figures, account for the accepted ones.

    A validated reply is recorded even if its round is then skipped: what it released reached the
    server all the same.
    """

    def __init__(self, cfg: RunConfig) -> None:
        if not cfg.privacy.enabled:
            raise ValueError("a privacy ledger needs privacy.mechanism = 'sample' or 'client'")
        self.cfg = cfg
        self.ledger = self.new_ledger()
        self.noise = SecureGaussian()

    def new_ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.cfg.privacy.accountant)

    @property
    def client_level(self) -> bool:
        return self.cfg.privacy.mechanism == "client"

    @property
    def noise_at_server(self) -> bool:
        return self.client_level and self.cfg.privacy.noise_at == "server"

    @staticmethod
    def check_figures(got: DPFigures | None, want: DPFigures) -> str | None:
        """None when a reply's figures are ``want``; else the reason it cannot count."""
        if got is None:
            return "privacy is on, but the reply carries no DP figures (is the client's privacy off?)"
        problem = figures_mismatch(got, want)
        return None if problem is None else f"DP figures: {problem}"

    def record(self, accepted: Mapping[int, DPFigures]) -> None:
        """Account one round's validated releases (node id -> its checked figures)."""
        if not accepted:
            return
        if self.client_level:
            f = next(iter(accepted.values()))
            self.ledger.record(
                CLIENT_LEVEL_UNIT, noise_multiplier=f.noise_multiplier, sample_rate=f.sample_rate, steps=1
            )
            return
        for node, f in sorted(accepted.items()):
            self.ledger.record(
                node, noise_multiplier=f.noise_multiplier, sample_rate=f.sample_rate, steps=f.steps
            )

    def server_noise_std(self) -> float | None:
        """Client level at a trusted server: sigma C on the round's sum (None: not this server's job)."""
        if not self.noise_at_server:
            return None
        f = client_figures(self.cfg)
        return f.noise_multiplier * f.clip

    def metrics(self) -> dict[str, float]:
        return self.ledger.report(self.cfg.privacy.delta)

    def state_dict(self) -> dict[str, StateValue]:
        """The ledger under ``dp.`` keys, to sit in the server's checkpoint."""
        return {f"{STATE_PREFIX}.{k}": v for k, v in self.ledger.state_dict().items()}

    def ledger_from_state(self, state: Mapping[str, StateValue]) -> PrivacyLedger:
        """The ledger a checkpoint holds (not yet installed: the caller assigns it once every other
        part of its state has validated); ValueError on a missing or foreign one."""
        head = f"{STATE_PREFIX}."
        sub = {k.removeprefix(head): v for k, v in state.items() if k.startswith(head)}
        if not sub:
            raise ValueError(
                "the checkpoint has no privacy ledger, but this run has privacy on; resume with the "
                "privacy config the run was started with"
            )
        ledger = self.new_ledger()
        ledger.load_state_dict(sub)
        return ledger
