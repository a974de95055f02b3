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

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedtune.config import RunConfig
from fedtune.privacy.noise import SecureGaussian
from fedtune.privacy.plan import (
    CLIENT_LEVEL_UNIT,
    ServerLedger,
    client_figures,
    client_noise_std,
    sample_figures,
)
from fedtune.privacy.plan import figures_mismatch as _mismatch
from fedtune.wire.dp_report import DPFigures

__all__ = ["CLIENT_LEVEL_UNIT", "DPPlan", "PerExampleRelease", "ServerPrivacy", "clip_round", "plan_for"]


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

    def figures(self) -> DPFigures:
        """What the reply reports (and the server accounts)."""
        return DPFigures(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            clip=self.clip,
        )


def sample_plan(cfg: RunConfig, *, num_examples: int, local_steps: int, batch_size: int) -> DPPlan:
    """Sample-level DP for one client: q = batch / its examples, one release per local step."""
    f = sample_figures(cfg, num_examples=num_examples, local_steps=local_steps, batch_size=batch_size)
    return DPPlan("sample", f.clip, f.noise_multiplier, f.sample_rate, f.steps, f.noise_multiplier * f.clip)


def client_plan(cfg: RunConfig) -> DPPlan:
    """Client-level DP: q = clients per round / clients, one release per round."""
    f = client_figures(cfg)
    std = client_noise_std(cfg, f)
    return DPPlan(
        "client",
        f.clip,
        f.noise_multiplier,
        f.sample_rate,
        f.steps,
        std,
        dense_reply=cfg.privacy.noise_at == "client",
    )


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
    return _mismatch(DPFigures(sigma, sample_rate, steps, clip), plan.figures())


class ServerPrivacy(ServerLedger):
    """The server's side of DP-FedKSeed: the shared ledger plus the noise of a trusted server per seed."""

    def __init__(self, cfg: RunConfig, num_seeds: int) -> None:
        super().__init__(cfg)
        self.num_seeds = num_seeds

    def plan(self, num_examples: int) -> DPPlan:
        plan = plan_for(self.cfg, num_examples=num_examples)
        if plan is None:  # pragma: no cover - ServerPrivacy exists only when privacy is on
            raise ValueError("privacy is off")
        return plan

    def server_noise(self) -> npt.NDArray[np.float64] | None:
        """Client-level DP with ``noise-at = "server"``: N(0, (sigma C)^2) per seed for the round's sum."""
        std = self.server_noise_std()
        return None if std is None else self.noise.normal(self.num_seeds, std)
