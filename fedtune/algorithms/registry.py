"""Name -> algorithm class registry, plus ``"package.module:Class"`` loading for outside code.

The same registry as the aggregators' (:class:`fedtune.plugins.Registry`): duplicates raise,
options from ``[algorithm.options]`` are checked against the constructor. Built-ins are listed
as lazy specs, so resolving ``lora-fedavg`` never imports FedKSeed and the other way round; this
is the only place that maps an algorithm name to code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from fedtune.algorithms.base import Algorithm
from fedtune.plugins import Registry

if TYPE_CHECKING:
    from fedtune.config import RunConfig

A = TypeVar("A", bound=Algorithm)

ALGORITHMS: Registry[Algorithm] = Registry(
    "algorithm",
    Algorithm,
    builtins={
        "fedkseed": "fedtune.fedkseed.algorithm:FedKSeed",
        "fedkseed-pro": "fedtune.fedkseed.algorithm:FedKSeedPro",
        "lora-fedavg": "fedtune.lora.algorithm:LoRAFedAvg",
        "sap": "fedtune.sap.algorithm:SplitAndPrivatize",
    },
)


def register_algorithm(name: str, *, force: bool = False) -> Callable[[type[A]], type[A]]:
    """Class decorator: register an :class:`Algorithm` under ``name`` (duplicates raise)."""
    return ALGORITHMS.register(name, force=force)


def available_algorithms() -> list[str]:
    """Registered and built-in names, sorted."""
    return ALGORITHMS.available()


def resolve_algorithm(spec: str) -> type[Algorithm]:
    """The class for a registered name or a ``"package.module:Class"`` path (ValueError if neither)."""
    return ALGORITHMS.resolve(spec)


def create_algorithm(cfg: RunConfig) -> Algorithm:
    """Build ``cfg.run.algorithm`` with its ``[algorithm.options]``, checked against its constructor."""
    return ALGORITHMS.create(cfg.run.algorithm, dict(cfg.algorithm.options), cfg)
