"""Aggregation rules behind a narrow, Flower-free research API.

Importing the package registers the built-ins: ``weighted-mean`` (default), ``median``,
``trimmed-mean``, ``clipped-mean``, ``krum`` and ``multi-krum``. Outside code plugs in through
``@register_aggregator`` or a ``"package.module:Class"`` spec; options come from the
``[aggregator.options]`` table and are checked against the constructor. See ``docs/aggregators.md``.
"""

from fedtune.aggregators.base import Aggregator, ClientUpdate, GlobalUpdate, StateValue
from fedtune.aggregators.batch import UpdateBatch
from fedtune.aggregators.clipped_mean import ClippedMean
from fedtune.aggregators.krum import Krum
from fedtune.aggregators.median import Median
from fedtune.aggregators.multi_krum import MultiKrum
from fedtune.aggregators.registry import (
    AGGREGATORS,
    available_aggregators,
    create_aggregator,
    register_aggregator,
    resolve_aggregator,
)
from fedtune.aggregators.trimmed_mean import TrimmedMean
from fedtune.aggregators.weighted_mean import WeightedMean

DEFAULT_AGGREGATOR = "weighted-mean"

__all__ = [
    "AGGREGATORS",
    "DEFAULT_AGGREGATOR",
    "Aggregator",
    "ClientUpdate",
    "ClippedMean",
    "GlobalUpdate",
    "Krum",
    "Median",
    "MultiKrum",
    "StateValue",
    "TrimmedMean",
    "UpdateBatch",
    "WeightedMean",
    "available_aggregators",
    "create_aggregator",
    "register_aggregator",
    "resolve_aggregator",
]
