"""One model replica per process: the model, its tokenizer and the FedKSeed client that tracks it.

Loading SmolLM2 costs seconds, so each process (a Ray actor holding many virtual clients, the
ServerApp, or a deployed node) keeps one replica per model configuration. Because the replica
knows its exact coefficient vector C, any node can sync it from wherever it stands: switching
between virtual clients costs a replay of the seeds that differ, never a reload.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.assets.device import resolve_device
from fedtune.assets.models import load_causal_lm, load_tokenizer
from fedtune.config import RunConfig
from fedtune.fedkseed.client import FedKSeedClient
from fedtune.zo import Fingerprint, MeZOStep, ParamSelection, ZOConfig, select_parameters


def fingerprint_digest(fp: Fingerprint) -> str:
    """The short form that travels in every FedKSeed message (sha256 of the fingerprint JSON)."""
    return hashlib.sha256(fp.to_json().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ReplicaKey:
    model: str
    num_layers: int
    device: str  # resolved ("cpu", "cuda:0"): "auto" and "cuda" on one GPU share a replica
    tune: str
    perturbation: str
    eps: float
    cache_z: str
    run_seed: int
    num_seeds: int
    rebuild_each_round: bool


@dataclass
class Replica:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    client: FedKSeedClient

    @property
    def fingerprint(self) -> str:
        return self.client.fingerprint


_LOCK = threading.Lock()
_REPLICAS: dict[ReplicaKey, Replica] = {}


def replica_key(cfg: RunConfig) -> ReplicaKey:
    return ReplicaKey(
        model=cfg.model.name,
        num_layers=cfg.model.num_layers,
        device=str(resolve_device(cfg.model.device)),
        tune=cfg.zo.tune,
        perturbation=cfg.zo.perturbation,
        eps=cfg.zo.eps,
        cache_z=cfg.zo.cache_z,
        run_seed=cfg.run.seed,
        num_seeds=cfg.fedkseed.num_seeds,
        rebuild_each_round=cfg.fedkseed.rebuild_each_round,
    )


def build_replica(cfg: RunConfig) -> Replica:
    """Load the pretrained model (C = 0) on ``model.device`` and wrap it in a FedKSeed client.

    The model moves (fp32) before the tuned tensors are selected, so the stepper, the replay and the
    forward passes all work on the device's tensors; directions are still generated on the CPU, so the
    fingerprint and every replayed weight match a CPU party's.
    """
    device = resolve_device(cfg.model.device)
    model = load_causal_lm(cfg.model.name, num_layers=cfg.model.num_layers or None, device=str(device))
    tokenizer = load_tokenizer(cfg.model.name)
    tuned = select_parameters(model, ParamSelection(mode=cfg.zo.tune))  # type: ignore[arg-type]
    zo_cfg = ZOConfig(eps=cfg.zo.eps, kind=cfg.zo.perturbation, cache_z=cfg.zo.cache_z)  # type: ignore[arg-type]
    stepper = MeZOStep(model, tuned, zo_cfg, run_seed=cfg.run.seed)
    fingerprint = fingerprint_digest(Fingerprint.of(tuned, kind=zo_cfg.kind, run_seed=cfg.run.seed))
    client = FedKSeedClient(
        stepper,
        num_seeds=cfg.fedkseed.num_seeds,
        run_seed=cfg.run.seed,
        fingerprint=fingerprint,
        rebuild_each_round=cfg.fedkseed.rebuild_each_round,
    )
    return Replica(model=model, tokenizer=tokenizer, client=client)


def get_replica(cfg: RunConfig) -> Replica:
    """The process-wide replica for this config (built on first use)."""
    key = replica_key(cfg)
    with _LOCK:
        if key not in _REPLICAS:
            _REPLICAS[key] = build_replica(cfg)
        return _REPLICAS[key]


def clear_replicas() -> None:
    """Drop cached replicas (tests, or a long-lived process switching runs)."""
    with _LOCK:
        _REPLICAS.clear()
