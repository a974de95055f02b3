"""DP-FedKSeed: differentially private zeroth-order scalars, sample- or client-level.

Sample level (DP-ZO, Tang et al., "Private Fine-tuning of Large Language Models with Zeroth-order
Optimization", arXiv 2401.04343; the mechanism of DPZero, Zhang et al. 2024): the direction z is
seeded and independent of the data, so only the scalar is private. Each example's two-point scalar
is clipped to [-C, C], the clipped scalars are summed, one Gaussian draw of std sigma*C is added to
the sum (from a cryptographically secure generator, never from the shared seeds) and the result is
divided by the batch size. Changing one example moves the sum by at most C, so each step is a
sampled Gaussian mechanism and opacus' accountants apply (``../docs/privacy.md``). DPZero's code
draws noise per parameter tensor and forgets to divide by the batch; neither happens here.

Client level (DP-FedAvg, McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018): a client's whole round, as its K-vector of per-seed scalars, is clipped to L2
norm C; Gaussian noise of std sigma*C on the round's sum is split over the sampled clients
(``noise-at = "client"``: std sigma*C/sqrt(m) each, on all K coordinates, so the server never sees
an unnoised contribution) or added once by a trusted server (``noise-at = "server"``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedtune.config import PrivacySection, RunConfig
from fedtune.privacy import PrivacyLedger, SecureGaussian, noise_multiplier_for

#: The unit client-level accounting is kept under (sample-level units are client ids, all >= 0).
CLIENT_LEVEL_UNIT = -1


@dataclass(frozen=True)
class DPPlan:
    """What a party does for privacy in one round, and what the accountant records for it.

    noise_std: the std this party adds per noised release (0 for a client whose server adds it).
    """

    mechanism: str
    clip: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    noise_std: float
    dense_reply: bool = False


@functools.lru_cache(maxsize=256)
def _sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    return noise_multiplier_for(
        target_epsilon, delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )


def _noise_multiplier(privacy: PrivacySection, sample_rate: float, total_steps: int) -> float:
    if privacy.noise_multiplier > 0:
        return privacy.noise_multiplier
    # target-epsilon: sigma for the whole run as if this unit took part in every round (an upper
    # bound on its steps, so the target holds whatever the sampling).
    return _sigma(privacy.target_epsilon, privacy.delta, sample_rate, total_steps, privacy.accountant)


def sample_plan(cfg: RunConfig, *, num_examples: int, local_steps: int, batch_size: int) -> DPPlan:
    """Sample-level DP for one client: q = batch / its examples, one release per local step."""
    if num_examples < 1:
        raise ValueError("a client with no examples cannot train privately")
    q = min(1.0, batch_size / num_examples)
    sigma = _noise_multiplier(cfg.privacy, q, local_steps * cfg.federation.num_rounds)
    return DPPlan("sample", cfg.privacy.clip, sigma, q, local_steps, sigma * cfg.privacy.clip)


def client_plan(cfg: RunConfig) -> DPPlan:
    """Client-level DP: q = clients per round / clients, one release per round."""
    fed, privacy = cfg.federation, cfg.privacy
    q = min(1.0, fed.clients_per_round / fed.num_clients)
    sigma = _noise_multiplier(privacy, q, fed.num_rounds)
    at_client = privacy.noise_at == "client"
    std = sigma * privacy.clip / math.sqrt(fed.clients_per_round) if at_client else 0.0
    return DPPlan("client", privacy.clip, sigma, q, 1, std, dense_reply=at_client)


def plan_for(cfg: RunConfig, *, num_examples: int) -> DPPlan | None:
    """The client's plan for ``cfg.privacy`` (None: no DP)."""
    if cfg.privacy.mechanism == "sample":
        return sample_plan(
            cfg, num_examples=num_examples, local_steps=cfg.zo.local_steps, batch_size=cfg.zo.batch_size
        )
    if cfg.privacy.mechanism == "client":
        return client_plan(cfg)
    return None


class PerExampleRelease:
    """DP-ZO's release of one step: clip each example's scalar, sum, add N(0, (sigma C)^2), divide by B."""

    def __init__(self, plan: DPPlan, noise: SecureGaussian | None = None) -> None:
        if plan.mechanism != "sample":
            raise ValueError("per-example release is the sample-level mechanism")
        self.plan = plan
        self.noise = noise or SecureGaussian()

    def __call__(self, scalars: npt.NDArray[np.float64]) -> float:
        if scalars.ndim != 1 or scalars.size == 0:
            raise ValueError(f"expected a non-empty vector of per-example scalars, got shape {scalars.shape}")
        c = self.plan.clip
        clipped = np.clip(scalars, -c, c)
        return float((clipped.sum() + self.noise.scalar(self.plan.noise_std)) / scalars.size)


def clip_round(
    seed_indices: npt.NDArray[np.int64], grads: npt.NDArray[np.floating], *, num_seeds: int, clip: float
) -> tuple[npt.NDArray[np.float64], float]:
    """A round's per-seed scalar vector (sum of g over steps on each seed) clipped to L2 norm ``clip``.

    Returns the dense clipped vector and the scale applied (1.0 when within the bound), so a sparse
    reply can send each step's g times that scale and the server rebuilds the same vector.
    """
    v = np.zeros(num_seeds, dtype=np.float64)
    np.add.at(v, np.asarray(seed_indices, dtype=np.int64), np.asarray(grads, dtype=np.float64))
    norm = float(np.linalg.norm(v))
    scale = 1.0 if norm <= clip else clip / norm
    return v * scale, scale


def figures_mismatch(
    plan: DPPlan, *, sigma: float, sample_rate: float, steps: int, clip: float
) -> str | None:
    """Why a reply's reported DP figures are not the ones the run's config implies (None: they are)."""
    checks = (
        ("clip", clip, plan.clip),
        ("noise multiplier", sigma, plan.noise_multiplier),
        ("sample rate", sample_rate, plan.sample_rate),
        ("steps", float(steps), float(plan.steps)),
    )
    for name, got, want in checks:
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=0.0):
            return f"reports {name} {got:g}, but the run's privacy config implies {want:g}"
    return None


class ServerPrivacy:
    """The server's side of DP-FedKSeed: check each reply's figures, account, add server noise.

    The ledger records what was released, so a reply counts once it passes validation, even in a
    round that is then skipped (its noised scalars reached the server all the same).
    """

    def __init__(self, cfg: RunConfig, num_seeds: int) -> None:
        self.cfg = cfg
        self.num_seeds = num_seeds
        self.ledger = self.new_ledger()
        self.noise = SecureGaussian()

    def new_ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.cfg.privacy.accountant)

    @property
    def client_level(self) -> bool:
        return self.cfg.privacy.mechanism == "client"

    def plan(self, num_examples: int) -> DPPlan:
        plan = plan_for(self.cfg, num_examples=num_examples)
        if plan is None:  # pragma: no cover - ServerPrivacy exists only when privacy is on
            raise ValueError("privacy is off")
        return plan

    def record(self, releases: dict[int, DPPlan]) -> None:
        """Account for one round's validated releases (node id -> the plan it followed)."""
        if not releases:
            return
        if self.client_level:
            plan = next(iter(releases.values()))
            self.ledger.record(
                CLIENT_LEVEL_UNIT,
                noise_multiplier=plan.noise_multiplier,
                sample_rate=plan.sample_rate,
                steps=1,
            )
            return
        for node, plan in sorted(releases.items()):
            self.ledger.record(
                node, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps
            )

    def server_noise(self) -> npt.NDArray[np.float64] | None:
        """Client-level DP with ``noise-at = "server"``: N(0, (sigma C)^2) per seed for the round's sum."""
        if not self.client_level or self.cfg.privacy.noise_at != "server":
            return None
        plan = client_plan(self.cfg)
        return self.noise.normal(self.num_seeds, plan.noise_multiplier * plan.clip)

    def metrics(self) -> dict[str, float]:
        return self.ledger.report(self.cfg.privacy.delta)
