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

import math
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from fedtune.config import RunConfig
from fedtune.data.batch import TokenBatch
from fedtune.data.node import NodeData
from fedtune.privacy.dp_sgd import DPSGDSettings, poisson_sample
from fedtune.privacy.noise import SecureGaussian
from fedtune.privacy.plan import (
    CLIENT_LEVEL_UNIT,
    ServerLedger,
    client_figures,
    client_noise_std,
    figures_mismatch,
    sample_figures,
)
from fedtune.wire.dp_report import DPFigures

__all__ = [
    "CLIENT_LEVEL_UNIT",
    "LoRAServerPrivacy",
    "client_noise_std",
    "clip_update",
    "dp_figures",
    "figures_mismatch",
    "private_client_update",
]
AdapterArrays = dict[str, npt.NDArray[np.float32]]


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
    if mechanism == "sample":
        lora = cfg.lora
        return sample_figures(
            cfg, num_examples=num_examples, local_steps=lora.local_steps, batch_size=lora.batch_size
        )
    if mechanism == "client":
        return client_figures(cfg)
    raise ValueError(f"privacy.mechanism {mechanism!r} is not implemented for LoRA-FedAvg")


def dp_sgd_settings(cfg: RunConfig, figures: DPFigures, num_examples: int) -> DPSGDSettings:
    return DPSGDSettings(
        noise_multiplier=figures.noise_multiplier,
        clip=figures.clip,
        expected_batch_size=expected_batch_size(cfg, num_examples),
    )


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


class LoRAServerPrivacy(ServerLedger):
    """The server's side for LoRA-FedAvg: the shared ledger, re-clipping and noise of a trusted server."""

    def check(self, dp: DPFigures | None, num_examples: int) -> str | None:
        """None when ``dp`` is what the config implies for a client of ``num_examples``."""
        want = dp_figures(self.cfg, num_examples=num_examples)
        if want is None:  # pragma: no cover - this object exists only with privacy on
            return None
        return self.check_figures(dp, want)

    def server_clip(self, delta: Mapping[str, npt.NDArray[np.float32]]) -> dict[str, npt.NDArray[np.float32]]:
        """Client level with the noise at the (trusted) server: it enforces the clip itself."""
        if not self.noise_at_server:
            return dict(delta)
        clipped, _ = clip_update(delta, self.cfg.privacy.clip)
        return {k: v.astype(np.float32) for k, v in clipped.items()}

    def server_noise(
        self, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, npt.NDArray[np.float64]] | None:
        """Client level, ``noise-at = "server"``: N(0, (sigma C)^2) per coordinate for the round's sum."""
        std = self.server_noise_std()
        if std is None:
            return None
        return {k: self.noise.normal(math.prod(s), std).reshape(s) for k, s in shapes.items()}
