"""Zeroth-order (MeZO / FedKSeed) tuning engine: seeded directions, two-point steps and seed replay."""

from fedtune.zo.directions import CacheMode, SeedDirection
from fedtune.zo.fingerprint import Fingerprint, IncompatibleModelError, check_compatible, zo_check_report
from fedtune.zo.loss import answer_loss
from fedtune.zo.params import ParamSelection, TunedParameters, select_parameters
from fedtune.zo.perturbation import (
    ENGINE_VERSION,
    MAX_SEED_INDEX,
    MAX_TENSORS,
    Perturbation,
    PerturbationKind,
)
from fedtune.zo.replay import Coefficients, nonzero_coefficients, replay
from fedtune.zo.step import MeZOStep, StepResult, ZOConfig
from fedtune.zo.trainer import train_zo

__all__ = [
    "ENGINE_VERSION",
    "MAX_SEED_INDEX",
    "MAX_TENSORS",
    "CacheMode",
    "Coefficients",
    "Fingerprint",
    "IncompatibleModelError",
    "MeZOStep",
    "ParamSelection",
    "Perturbation",
    "PerturbationKind",
    "SeedDirection",
    "StepResult",
    "TunedParameters",
    "ZOConfig",
    "answer_loss",
    "check_compatible",
    "nonzero_coefficients",
    "replay",
    "select_parameters",
    "train_zo",
    "zo_check_report",
]
