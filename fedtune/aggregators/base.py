"""The research API for aggregation: typed update records and the ``Aggregator`` interface.

An aggregator turns the validated updates of one round into one global update. It never sees
Flower types or untyped dicts: FedKSeed clients arrive as one dense float32 vector of per-seed
coefficients (``"coefficients"``, length K); LoRA clients as one float32 array per adapter tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
StateValue = int | float | str | bool | npt.NDArray[np.generic]


def _frozen_arrays(arrays: Mapping[str, npt.ArrayLike], what: str) -> Mapping[str, FloatArray]:
    if not arrays:
        raise ValueError(f"{what} has no arrays; pass at least one named float32 array")
    out: dict[str, FloatArray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: array names must be non-empty strings, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype != np.float32:
            raise ValueError(f"{what}: array {name!r} has dtype {arr.dtype}; convert it to float32")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: array {name!r} holds NaN or Inf; drop or clip the update")
        arr = arr.copy()
        arr.flags.writeable = False
        out[name] = arr
    return MappingProxyType(out)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's validated contribution to a round.

    Attributes
    ----------
    node_id:
        The node that sent it (for logs and per-client state such as reputation).
    num_examples:
        How many training examples stand behind it; weighted aggregators use it as the weight.
    arrays:
        Named float32 arrays, read-only. All updates of one round share names and shapes.
    """

    node_id: int
    num_examples: int
    arrays: Mapping[str, FloatArray]

    def __post_init__(self) -> None:
        if self.num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {self.num_examples} (node {self.node_id})")
        object.__setattr__(self, "arrays", _frozen_arrays(self.arrays, f"update from node {self.node_id}"))


@dataclass(frozen=True)
class GlobalUpdate:
    """The aggregate of one round: same names and shapes as the client arrays.

    Attributes
    ----------
    arrays:
        Named float32 arrays, read-only.
    num_clients:
        How many client updates the aggregator received (not how many it kept: Krum keeps one).
    kept:
        The node ids whose updates shaped the result, for selection rules (Krum keeps one,
        Multi-Krum ``m``); ``None`` means every update counted. Algorithms that learn from
        updates (FedKSeed-Pro's seed importance) learn only from these.
    """

    arrays: Mapping[str, FloatArray]
    num_clients: int
    kept: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_clients <= 0:
            raise ValueError(f"num_clients must be positive, got {self.num_clients}")
        if self.kept is not None and not 1 <= len(self.kept) <= self.num_clients:
            raise ValueError(f"kept names {len(self.kept)} nodes; it must name 1..{self.num_clients}")
        object.__setattr__(self, "arrays", _frozen_arrays(self.arrays, "global update"))


class Aggregator(ABC):
    """Combine the client updates of one round into the global update (no I/O, no Flower).

    Subclasses implement :meth:`aggregate`; stateful ones also override :meth:`state_dict` and
    :meth:`load_state_dict`, which the server checkpoints with the rest of its state.

    Attributes
    ----------
    name:
        The registry name (set by ``register_aggregator``; empty for unregistered classes).
    permutation_invariant:
        A claim, checked by the conformance suite: the result is bit-identical for any order of
        the updates (ties broken by ``node_id``). Off unless a subclass says so.
    """

    name: ClassVar[str] = ""
    permutation_invariant: ClassVar[bool] = False

    @property
    def min_clients(self) -> int:
        """Fewest updates :meth:`aggregate` accepts, so strategies can check their sampling up front."""
        return 1

    @abstractmethod
    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        """Return the global update for ``server_round`` from a non-empty list of updates."""

    def state_dict(self) -> dict[str, StateValue]:
        """Return the aggregator's state (empty for stateless aggregators)."""
        return {}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore state saved by :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state keys {sorted(state)}")
