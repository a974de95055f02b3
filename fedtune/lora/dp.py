"""Differential privacy for LoRA-FedAvg: what each side does, and how the server checks and accounts.

Sample level (``privacy.mechanism = "sample"``): the client's local steps are DP-SGD (Abadi et al.
2016) through opacus (:mod:`fedtune.privacy.dp_sgd`): each step Poisson-samples the client's
examples at q = lora.batch_size / N, clips each example's LoRA gradient to ``privacy.clip`` and
adds N(0, (sigma C)^2) to the sum. The reply carries (sigma, q, steps, C); the server recomputes
them from the config and the reply's example count and accounts per client (its node id).

Client level (``"client"``, DP-FedAvg: McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018): the client's round update (trained adapter minus the received global
one, all tensors as one vector) is clipped to L2 norm C. Noise of std sigma*C on the round's sum is
either split over the m = clients_per_round sampled clients (``noise-at = "client"``: each adds
N(0, (sigma C)^2 / m) per coordinate, so the server never sees an unnoised update; a client that
drops out takes its share with it, so the sum carries less noise than sigma*C and the accounted
epsilon is then optimistic) or added once by a trusted server (``noise-at = "server"``, which also
re-clips every update). One unit (-1) is accounted with q = m / num_clients, one release a round.

Sigma is ``privacy.noise-multiplier``, or derived from ``privacy.target-epsilon`` over the whole
run as if the unit took part in every round (an upper bound on its releases).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import StateValue
from fedtune.algorithms.rounds import under_prefix, with_prefix
from fedtune.config import RunConfig
from fedtune.data.batch import TokenBatch
from fedtune.data.node import NodeData
from fedtune.privacy import PrivacyLedger, SecureGaussian, noise_multiplier_for
from fedtune.privacy.dp_sgd import DPSGDSettings, poisson_sample
from fedtune.wire.dp_report import DPFigures

#: The accounting unit of client-level DP (sample-level units are node ids).
CLIENT_LEVEL_UNIT = -1
AdapterArrays = dict[str, npt.NDArray[np.float32]]
_STATE_PREFIX = "dp"


@functools.lru_cache(maxsize=1024)
def _derived_sigma(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    return noise_multiplier_for(
        target_epsilon, delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )


def _sigma(cfg: RunConfig, sample_rate: float, run_steps: int) -> float:
    p = cfg.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    return _derived_sigma(p.target_epsilon, p.delta, sample_rate, run_steps, p.accountant)


def expected_batch_size(cfg: RunConfig, num_examples: int) -> int:
    """q * N: the expected size of a Poisson batch, the divisor of the noised gradient sum."""
    return max(1, min(cfg.lora.batch_size, num_examples))


def dp_figures(cfg: RunConfig, *, num_examples: int) -> DPFigures | None:
    """The mechanism a client with ``num_examples`` examples runs this round (None: privacy off).

    The server calls it with the reply's example count to check the reply's figures.
    """
    mechanism = cfg.privacy.mechanism
    if mechanism == "none":
        return None
    if num_examples < 1:
        raise ValueError("a client with no examples cannot train privately")
    fed, lora = cfg.federation, cfg.lora
    if mechanism == "sample":
        q = expected_batch_size(cfg, num_examples) / num_examples
        sigma = _sigma(cfg, q, lora.local_steps * fed.num_rounds)
        return DPFigures(noise_multiplier=sigma, sample_rate=q, steps=lora.local_steps, clip=cfg.privacy.clip)
    if mechanism == "client":
        q = min(1.0, fed.clients_per_round / fed.num_clients)
        sigma = _sigma(cfg, q, fed.num_rounds)
        return DPFigures(noise_multiplier=sigma, sample_rate=q, steps=1, clip=cfg.privacy.clip)
    raise ValueError(f"privacy.mechanism {mechanism!r} is not implemented for LoRA-FedAvg")


def dp_sgd_settings(cfg: RunConfig, figures: DPFigures, num_examples: int) -> DPSGDSettings:
    return DPSGDSettings(
        noise_multiplier=figures.noise_multiplier,
        clip=figures.clip,
        expected_batch_size=expected_batch_size(cfg, num_examples),
    )


def client_noise_std(cfg: RunConfig, figures: DPFigures) -> float:
    """Client-level DP: the std each client adds per coordinate (0 when the server adds the noise)."""
    if cfg.privacy.noise_at != "client":
        return 0.0
    return figures.noise_multiplier * figures.clip / math.sqrt(cfg.federation.clients_per_round)


def poisson_batches(
    data: NodeData,
    tokenizer: object,
    *,
    sample_rate: float,
    max_length: int,
    template: str,
    rng: SecureGaussian,
) -> Callable[[int], TokenBatch | None]:
    """``step -> TokenBatch | None``: an independent Poisson sample of the node's examples per step,
    drawn from the CSPRNG (None: nobody drawn this step)."""
    from fedtune.data.collate import assemble_batch

    tokens = data.tokenized(tokenizer, template=template)  # type: ignore[arg-type]
    n = len(tokens)

    def batch_for_step(_step: int) -> TokenBatch | None:
        idx = poisson_sample(n, sample_rate, rng)
        if idx.size == 0:
            return None
        return assemble_batch(
            tokenizer,  # type: ignore[arg-type]
            [tokens.prompt(int(i)) for i in idx],
            [tokens.answer(int(i)) for i in idx],
            max_length=max_length,
            log_truncated=False,
        )

    return batch_for_step


def _norm(arrays: Mapping[str, npt.NDArray[np.floating]]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values()))


def clip_update(
    update: Mapping[str, npt.NDArray[np.floating]], clip: float
) -> tuple[dict[str, npt.NDArray[np.float64]], float]:
    """The update (all tensors as one vector) scaled to L2 norm <= ``clip``; also its norm before."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = _norm(update)
    scale = 1.0 if norm <= clip else clip / norm
    return {k: np.asarray(v, np.float64) * scale for k, v in update.items()}, norm


def private_client_update(
    trained: Mapping[str, npt.NDArray[np.float32]],
    received: Mapping[str, npt.NDArray[np.float32]],
    *,
    clip: float,
    noise_std: float,
    rng: SecureGaussian,
) -> AdapterArrays:
    """Client-level DP on the client: received + clip(trained - received) + N(0, noise_std^2).

    Returned as adapter weights (what the reply carries); the server takes the delta again.
    """
    delta = {k: np.asarray(trained[k], np.float64) - np.asarray(v, np.float64) for k, v in received.items()}
    clipped, _ = clip_update(delta, clip)
    out: AdapterArrays = {}
    for k, ref in received.items():
        noisy = clipped[k] + rng.normal(ref.size, noise_std).reshape(ref.shape)
        out[k] = (np.asarray(ref, np.float64) + noisy).astype(np.float32)
    return out


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


class LoRAServerPrivacy:
    """The server's side: check each reply's figures, account for accepted ones, server noise.

    A validated reply is recorded even if its round is then skipped: its update reached the server.
    """

    def __init__(self, cfg: RunConfig) -> None:
        if not cfg.privacy.enabled:
            raise ValueError("LoRAServerPrivacy needs privacy.mechanism = 'sample' or 'client'")
        self.cfg = cfg
        self.ledger = PrivacyLedger(cfg.privacy.accountant)
        self.noise = SecureGaussian()

    @property
    def client_level(self) -> bool:
        return self.cfg.privacy.mechanism == "client"

    def check(self, dp: DPFigures | None, num_examples: int) -> str | None:
        """None when ``dp`` is what the config implies for a client of ``num_examples``."""
        if dp is None:
            return "privacy is on, but the reply carries no DP figures (a client without privacy.mechanism?)"
        want = dp_figures(self.cfg, num_examples=num_examples)
        if want is None:  # pragma: no cover - this object exists only with privacy on
            return None
        problem = figures_mismatch(dp, want)
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

    def server_clip(self, delta: Mapping[str, npt.NDArray[np.float32]]) -> dict[str, npt.NDArray[np.float32]]:
        """Client level with the noise at the (trusted) server: it enforces the clip itself."""
        if not self.client_level or self.cfg.privacy.noise_at != "server":
            return dict(delta)
        clipped, _ = clip_update(delta, self.cfg.privacy.clip)
        return {k: v.astype(np.float32) for k, v in clipped.items()}

    def server_noise(
        self, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, npt.NDArray[np.float64]] | None:
        """Client level, ``noise-at = "server"``: N(0, (sigma C)^2) per coordinate for the round's sum."""
        if not self.client_level or self.cfg.privacy.noise_at != "server":
            return None
        f = dp_figures(self.cfg, num_examples=1)
        if f is None:  # pragma: no cover
            return None
        std = f.noise_multiplier * f.clip
        return {k: self.noise.normal(math.prod(s), std).reshape(s) for k, s in shapes.items()}

    def metrics(self) -> dict[str, float]:
        return self.ledger.report(self.cfg.privacy.delta)

    def state_dict(self) -> dict[str, StateValue]:
        return with_prefix(_STATE_PREFIX, dict(self.ledger.state_dict()))

    def ledger_from_state(self, state: Mapping[str, StateValue]) -> PrivacyLedger:
        """The ledger a checkpoint holds (not yet installed: the caller assigns it once every other
        part of its state has validated); ValueError on a missing or foreign one."""
        sub = under_prefix(_STATE_PREFIX, state)
        if not sub:
            raise ValueError(
                "the checkpoint has no privacy ledger, but this run has privacy on; resume with the "
                "privacy config the run was started with"
            )
        ledger = PrivacyLedger(self.cfg.privacy.accountant)
        ledger.load_state_dict(sub)
        return ledger
