"""FedKSeed client: sync by seed replay, then tau local two-point steps on seeds from the pool.

FedKSeed (Qin et al., ICML 2024, Alg. 1). The client's model always equals
theta_0 + sum_s C_s z_s for a coefficient vector C it tracks exactly, so syncing to the server's
accumulator A replays only A - C (the seeds that changed), whatever rounds the client missed.
A fresh process starts from C = 0 (the pretrained weights) and replays A in full; cost is
bounded by K.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from fedtune.algorithms.rounds import peak_rss_mb
from fedtune.data.batch import TokenBatch
from fedtune.fedkseed.dp import DPPlan, PerExampleRelease, clip_round
from fedtune.privacy.noise import SecureGaussian
from fedtune.runlog import PhaseTimer
from fedtune.wire.codec import ReplyPayload, SparseDelta, SyncPayload, probabilities_from_quantized
from fedtune.zo import MeZOStep, replay

SEED_SAMPLING_TAG = 0x5EED5


class StaleSyncError(RuntimeError):
    """A sparse sync names a base version this node does not hold; the server resends relative to zero."""


@dataclass(frozen=True)
class NodeView:
    """What a node last learned of the global accumulator: A as of the start of round ``version``.

    Kept on disk between rounds, so sparse syncs work across process restarts.
    """

    version: int
    accumulator: npt.NDArray[np.float64]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, version=np.int64(self.version), accumulator=self.accumulator)
        tmp.replace(path)

    @staticmethod
    def load(path: Path, num_seeds: int) -> NodeView | None:
        if not path.is_file():
            return None
        with np.load(path) as data:
            acc = data["accumulator"].astype(np.float64)
            if acc.shape != (num_seeds,):
                return None
            return NodeView(int(data["version"]), acc)


def resolve_accumulator(sync: SyncPayload, view: NodeView | None) -> npt.NDArray[np.float64]:
    """The full accumulator the server means, from a dense payload or a sparse delta on ``view``."""
    if isinstance(sync.accumulator, SparseDelta):
        d = sync.accumulator
        if d.base_round == 0:  # relative to zero: the whole accumulator, whatever this node holds
            view = NodeView(0, np.zeros(sync.num_seeds, dtype=np.float64))
        if view is None or view.version != d.base_round:
            have = "nothing" if view is None else f"round {view.version}"
            raise StaleSyncError(f"sparse sync against round {d.base_round}, but this node holds {have}")
        acc = view.accumulator.copy()
        acc[d.indices.astype(np.int64)] += d.values.astype(np.float64)
        return acc
    return np.asarray(sync.accumulator, dtype=np.float64)


class FedKSeedClient:
    """A model plus the exact coefficient vector C that separates it from the pretrained weights."""

    def __init__(
        self,
        stepper: MeZOStep,
        *,
        num_seeds: int,
        run_seed: int,
        fingerprint: str,
        rebuild_each_round: bool = False,
    ) -> None:
        self.stepper = stepper
        self.num_seeds = num_seeds
        self.run_seed = run_seed
        self.fingerprint = fingerprint
        self.coefficients = np.zeros(num_seeds, dtype=np.float64)
        # Incremental replays make the float32 weights depend (by rounding) on the path taken to
        # them; rebuilding from theta_0 at a round's first sync makes each round a function of A
        # alone, so a resumed run (a fresh process) is bit-identical to one that never stopped.
        self._theta0 = [p.detach().clone() for p in stepper.tuned.tensors] if rebuild_each_round else None
        self._rebuilt_round = -1
        self._pristine = True

    @property
    def pristine(self) -> bool:
        """True until the first sync or restore: the model is still exactly theta_0 (C = 0)."""
        return self._pristine

    def restore(self, tensors: Sequence[torch.Tensor], coefficients: npt.NDArray[np.float64]) -> None:
        """Take weights saved with the exact coefficients they hold (a verified node state file)."""
        if coefficients.shape != (self.num_seeds,):
            raise ValueError(f"coefficients have shape {coefficients.shape}, expected ({self.num_seeds},)")
        with torch.no_grad():
            for p, saved in zip(self.stepper.tuned.tensors, tensors, strict=True):
                p.copy_(saved)
        self.coefficients = np.asarray(coefficients, dtype=np.float64).copy()
        self._pristine = False

    def sync_to(self, target: npt.NDArray[np.float64], *, server_round: int | None = None) -> int:
        """Replay target - C onto the model; returns how many seeds were replayed.

        With ``rebuild_each_round``, the first sync of each ``server_round`` restores theta_0 and
        replays the whole target instead.
        """
        if target.shape != (self.num_seeds,):
            raise ValueError(f"accumulator has shape {target.shape}, expected ({self.num_seeds},)")
        if self._theta0 is not None and server_round is not None and server_round != self._rebuilt_round:
            with torch.no_grad():
                for p, p0 in zip(self.stepper.tuned.tensors, self._theta0, strict=True):
                    p.copy_(p0)
            self.coefficients = np.zeros(self.num_seeds, dtype=np.float64)
            self._rebuilt_round = server_round
        delta = target - self.coefficients
        nz = np.flatnonzero(delta)
        if nz.size:
            replay(self.stepper.tuned, self.stepper.perturbation, (nz, delta[nz]))
        self.coefficients = target.astype(np.float64, copy=True)
        self._pristine = False
        return int(nz.size)

    def draw_seeds(self, sync: SyncPayload, client_key: int) -> npt.NDArray[np.int64]:
        """Seed indices for this round's steps: uniform, or FedKSeed-Pro's importance sampling.

        ``client_key`` is the client's stable identity (its partition id), so a run is
        reproducible from the run seed whatever node ids the runtime hands out.
        """
        rng = np.random.default_rng(
            np.random.SeedSequence([SEED_SAMPLING_TAG, self.run_seed, sync.server_round, client_key])
        )
        if sync.quantized_probabilities is None:
            return rng.integers(0, self.num_seeds, size=sync.num_local_steps, dtype=np.int64)
        p = probabilities_from_quantized(sync.quantized_probabilities)
        return rng.choice(self.num_seeds, size=sync.num_local_steps, p=p).astype(np.int64)

    def train_round(
        self,
        sync: SyncPayload,
        *,
        client_key: int,
        view: NodeView | None,
        batch_for_step: Callable[[int], TokenBatch],
        num_examples: int,
        timer: PhaseTimer | None = None,
        dp: DPPlan | None = None,
    ) -> tuple[ReplyPayload, NodeView]:
        """Sync, run the local steps, and return the reply plus the node's new view of A.

        ``timer`` gets the ``replay`` and ``train`` phases and the ``replayed_seeds`` count. ``dp``
        makes the reply differentially private (:mod:`fedtune.fedkseed.dp`).
        """
        timer = timer or PhaseTimer()
        if sync.fingerprint != self.fingerprint:
            raise ValueError(
                "the server's model/perturbation fingerprint differs from this client's; "
                "run `fedtune zo-check` "
                "on both sides and use the same model, tuned parameters and perturbation kind"
            )
        if sync.num_seeds != self.num_seeds:
            raise ValueError(f"server uses K={sync.num_seeds} seeds, this client K={self.num_seeds}")
        target = resolve_accumulator(sync, view)
        with timer.phase("replay"):
            timer.count("replayed_seeds", self.sync_to(target, server_round=sync.server_round))
        with timer.phase("train"):
            return self._local_steps(sync, target, client_key, batch_for_step, num_examples, dp)

    def _local_steps(
        self,
        sync: SyncPayload,
        target: npt.NDArray[np.float64],
        client_key: int,
        batch_for_step: Callable[[int], TokenBatch],
        num_examples: int,
        dp: DPPlan | None = None,
    ) -> tuple[ReplyPayload, NodeView]:
        seeds = self.draw_seeds(sync, client_key)
        noise = SecureGaussian() if dp is not None else None
        release = PerExampleRelease(dp, noise) if dp is not None and dp.mechanism == "sample" else None
        kept_seeds: list[int] = []
        grads: list[float] = []
        losses: list[float] = []
        skipped = 0
        for t, seed in enumerate(seeds):
            result = self.stepper.step(batch_for_step(t), int(seed), sync.lr, release=release)
            if result.skipped:
                skipped += 1
                continue
            kept_seeds.append(int(seed))
            grads.append(result.projected_grad)
            losses.append(0.5 * (result.loss_plus + result.loss_minus))
            self.coefficients[int(seed)] -= sync.lr * result.projected_grad
        indices = np.asarray(kept_seeds, dtype=np.int64)
        released = np.asarray(grads, dtype=np.float64)
        if dp is not None and dp.mechanism == "client" and noise is not None:
            # The round is the release: its per-seed vector is clipped (the local model keeps the
            # unclipped steps; the next sync replaces them with the global result).
            clipped, scale = clip_round(indices, released, num_seeds=self.num_seeds, clip=dp.clip)
            if dp.dense_reply:  # noise on every seed, so nothing unnoised leaves the client
                indices = np.arange(self.num_seeds, dtype=np.int64)
                released = clipped + noise.normal(self.num_seeds, dp.noise_std)
            else:
                released = released * scale
        reply = ReplyPayload(
            server_round=sync.server_round,
            num_seeds=self.num_seeds,
            num_examples=num_examples,
            seed_indices=indices,
            projected_grads=released.astype(np.float32),
            # All steps skipped (NaN losses): report 0 loss; the skipped count says what happened.
            train_loss=float(np.mean(losses)) if losses else 0.0,
            num_skipped_steps=skipped,
            peak_memory_mb=peak_rss_mb(),
            fingerprint=self.fingerprint,
        )
        return reply, NodeView(sync.server_round, target)
