"""DeComFL's model side: exact seed coefficients, the node's on-disk view, and a process replica.

Every model in a run is ``theta_0 + sum_s c_s z_s`` over seed indices ``s`` of the shared
perturbation (:class:`fedtune.zo.Perturbation`). :class:`SeedCoefficients` keeps ``c`` exactly
(float64, sparse), so moving a model between any two points is one :func:`fedtune.zo.replay` of
the coefficient difference: a client undoes its own local steps and applies the rounds it missed
in one pass, and a fresh process (``c = 0``, the pretrained weights) replays the whole history.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.assets.models import load_causal_lm, load_tokenizer
from fedtune.config import RunConfig
from fedtune.data.batch import TokenBatch
from fedtune.zo import (
    Fingerprint,
    MeZOStep,
    ParamSelection,
    PerturbationKind,
    ZOConfig,
    replay,
    select_parameters,
)
from fedtune.zo.directions import CacheMode
from fedtune.zo.params import SelectionMode

from .payload import HistoryEntry, PayloadError, check_seeds

log = logging.getLogger(__name__)

VIEW_FILE = "decomfl-view.npz"
VIEW_SCHEMA = 1


class SeedCoefficients:
    """A sparse map seed index -> coefficient (float64): the model ``theta_0 + sum_s c_s z_s``.

    Server and clients build it with the same :meth:`add_entry` calls in round order, so their
    maps are bit-identical, not merely close.
    """

    def __init__(self, values: Mapping[int, float] | None = None) -> None:
        self._c: dict[int, float] = {int(k): float(v) for k, v in (values or {}).items() if v != 0.0}

    def __len__(self) -> int:
        return len(self._c)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SeedCoefficients) and self._c == other._c

    def copy(self) -> SeedCoefficients:
        out = SeedCoefficients()
        out._c = dict(self._c)
        return out

    def get(self, seed: int) -> float:
        return self._c.get(int(seed), 0.0)

    def add(self, seed: int, value: float) -> None:
        s = int(seed)
        total = self._c.get(s, 0.0) + float(value)
        if total == 0.0:
            self._c.pop(s, None)
        else:
            self._c[s] = total

    def add_entry(self, entry: HistoryEntry, num_perturbations: int) -> None:
        """Fold one aggregated round in (a round's seeds are distinct, so order within it is moot)."""
        for seed, value in zip(
            entry.seeds.tolist(), entry.coefficients(num_perturbations).tolist(), strict=True
        ):
            self.add(seed, value)

    def minus(self, other: SeedCoefficients) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """The non-zero entries of ``self - other`` as (seed indices, values), seeds increasing."""
        keys = sorted(self._c.keys() | other._c.keys())
        values = [self._c.get(k, 0.0) - other._c.get(k, 0.0) for k in keys]
        pairs = [(k, v) for k, v in zip(keys, values, strict=True) if v != 0.0]
        return (
            np.asarray([k for k, _ in pairs], dtype=np.int64),
            np.asarray([v for _, v in pairs], dtype=np.float64),
        )

    def arrays(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """(seed indices, values), seeds increasing."""
        return self.minus(SeedCoefficients())

    @classmethod
    def from_arrays(cls, seeds: npt.ArrayLike, values: npt.ArrayLike) -> SeedCoefficients:
        s = np.asarray(seeds)
        v = np.asarray(values, dtype=np.float64)
        if s.ndim != 1 or s.shape != v.shape or (s.size and not np.issubdtype(s.dtype, np.integer)):
            raise ValueError("coefficients need equal-length 1-D integer seeds and float values")
        if not np.isfinite(v).all():
            raise ValueError("coefficients hold NaN or Inf")
        if s.size and int(s.min()) < 0:
            raise ValueError("coefficient seeds must be >= 0")
        try:
            check_seeds("coefficient seeds", s.astype(np.uint32), int(s.size))
        except PayloadError as exc:
            raise ValueError(str(exc)) from None
        return cls(dict(zip(s.tolist(), v.tolist(), strict=True)))


@dataclass(frozen=True)
class NodeView:
    """What a node holds on disk: the global model as of round ``version`` (all rounds <= it folded in).

    Written atomically into ``NodeContext.state_dir`` after every round the node trains, so it
    survives process restarts (a deployed node runs a fresh process per message).
    """

    version: int
    coefficients: SeedCoefficients = field(default_factory=SeedCoefficients)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        seeds, values = self.coefficients.arrays()
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(
                fh, schema=np.int64(VIEW_SCHEMA), version=np.int64(self.version), seeds=seeds, values=values
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> NodeView | None:
        """The saved view, or None when there is none or it is unreadable (the node holds nothing)."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["schema"]) != VIEW_SCHEMA:
                    raise ValueError(f"view schema {int(data['schema'])}, this code reads {VIEW_SCHEMA}")
                version = int(data["version"])
                if version < 0:
                    raise ValueError(f"negative version {version}")
                return NodeView(version, SeedCoefficients.from_arrays(data["seeds"], data["values"]))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable DeComFL view %s: %s", path, exc)
            return None


@dataclass(frozen=True)
class LocalRound:
    """What the local steps produced: one scalar per (step, perturbation), step-major."""

    scalars: npt.NDArray[np.float32]
    train_loss: float
    num_skipped: int


class Replica:
    """A model plus the exact coefficients that separate it from the pretrained weights."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        stepper: MeZOStep,
        fingerprint: str,
        *,
        keep_theta0: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stepper = stepper
        self.fingerprint = fingerprint
        self.coefficients = SeedCoefficients()
        # A copy of the pretrained tuned weights, for syncs that rebuild instead of moving.
        self._theta0 = [t.detach().clone() for t in stepper.tuned.tensors] if keep_theta0 else None

    def sync_to(self, target: SeedCoefficients, *, rebuild: bool = False) -> int:
        """Move the model to ``target`` with one replay of the difference; returns seeds replayed.

        Moving is exact in the coefficients, but float32 weights pick up rounding along the path
        taken. ``rebuild`` restores theta_0 first and replays all of ``target``, so the weights
        are a function of ``target`` alone (bit-identical to any other rebuild of it); it needs a
        replica built with ``keep_theta0``.
        """
        if rebuild:
            if self._theta0 is None:
                raise ValueError("rebuild needs a replica built with keep_theta0=True")
            with torch.no_grad():
                for tensor, start in zip(self.stepper.tuned.tensors, self._theta0, strict=True):
                    tensor.copy_(start)
            self.coefficients = SeedCoefficients()
        seeds, values = target.minus(self.coefficients)
        if seeds.size:
            replay(self.stepper.tuned, self.stepper.perturbation, (seeds, values))
        self.coefficients = target.copy()
        return int(seeds.size)

    def local_round(
        self,
        seeds: npt.NDArray[np.uint32],
        *,
        lr: float,
        num_perturbations: int,
        batch_for_step: Callable[[int], TokenBatch],
    ) -> LocalRound:
        """DeComFL's local steps on the server's seeds: ``x -= (lr / P) sum_p g_p z_p`` per step.

        All P projected gradients of a step are measured at the same point: the first P - 1
        evaluations leave the weights as they were (lr 0), the last one fuses its own update into
        its restore pass, and the other P - 1 updates follow in one replay.
        """
        num_p = num_perturbations
        step_lr = lr / num_p
        scalars = np.zeros(seeds.size, dtype=np.float64)
        losses: list[float] = []
        skipped = 0
        for t in range(seeds.size // num_p):
            batch = batch_for_step(t)
            step = [int(s) for s in seeds[t * num_p : (t + 1) * num_p]]
            for p, seed in enumerate(step):
                last = p == num_p - 1
                result = self.stepper.step(batch, seed, step_lr if last else 0.0)
                if result.skipped:
                    skipped += 1
                    continue
                scalars[t * num_p + p] = result.projected_grad
                losses.append(0.5 * (result.loss_plus + result.loss_minus))
                if last:
                    self.coefficients.add(seed, -step_lr * result.projected_grad)
            others = [(s, -step_lr * scalars[t * num_p + p]) for p, s in enumerate(step[:-1])]
            others = [(s, c) for s, c in others if c != 0.0]
            if others:
                replay(
                    self.stepper.tuned,
                    self.stepper.perturbation,
                    ([s for s, _ in others], [c for _, c in others]),
                )
                for s, c in others:
                    self.coefficients.add(s, c)
        return LocalRound(
            scalars=scalars.astype(np.float32),
            # Every evaluation skipped (NaN losses): report 0; num_skipped says what happened.
            train_loss=float(np.mean(losses)) if losses else 0.0,
            num_skipped=skipped,
        )


def fingerprint_digest(fp: Fingerprint) -> str:
    """sha256 of the fingerprint JSON: what `fedtune zo-check` compares, as FedKSeed sends it."""
    return hashlib.sha256(fp.to_json().encode("utf-8")).hexdigest()


def replica_key(cfg: RunConfig, keep_theta0: bool) -> tuple[object, ...]:
    zo = cfg.zo
    model = (cfg.model.name, cfg.model.num_layers)
    return (*model, zo.tune, zo.perturbation, zo.eps, zo.cache_z, cfg.run.seed, keep_theta0)


def build_replica(cfg: RunConfig, *, keep_theta0: bool = False) -> Replica:
    """Load the pretrained model (c = 0) with its MeZO stepper; never cached."""
    model = load_causal_lm(cfg.model.name, num_layers=cfg.model.num_layers or None)
    tokenizer = load_tokenizer(cfg.model.name)
    tuned = select_parameters(model, ParamSelection(mode=cast(SelectionMode, cfg.zo.tune)))
    kind = cast(PerturbationKind, cfg.zo.perturbation)
    zo_cfg = ZOConfig(eps=cfg.zo.eps, kind=kind, cache_z=cast(CacheMode, cfg.zo.cache_z))
    stepper = MeZOStep(model, tuned, zo_cfg, run_seed=cfg.run.seed)
    fingerprint = fingerprint_digest(Fingerprint.of(tuned, kind=kind, run_seed=cfg.run.seed))
    return Replica(model, tokenizer, stepper, fingerprint, keep_theta0=keep_theta0)


_LOCK = threading.Lock()
_REPLICAS: dict[tuple[object, ...], Replica] = {}


def get_replica(cfg: RunConfig, *, keep_theta0: bool = False) -> Replica:
    """The process-wide replica for this model configuration (built on first use).

    Shared by every virtual client and the server's evaluation in one process: each user syncs
    it to the coefficients it needs first, so switching between them costs a replay, not a load.
    """
    key = replica_key(cfg, keep_theta0)
    with _LOCK:
        if key not in _REPLICAS:
            _REPLICAS[key] = build_replica(cfg, keep_theta0=keep_theta0)
        return _REPLICAS[key]


def clear_replicas() -> None:
    """Drop cached replicas (tests, or a long-lived process switching runs)."""
    with _LOCK:
        _REPLICAS.clear()
