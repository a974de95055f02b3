"""The aggregator extension point: a :class:`fedtune.plugins.Registry` of :class:`Aggregator` classes.

The built-ins register themselves with :func:`register_aggregator` when ``fedtune.aggregators`` is
imported (they are NumPy-only, so there is nothing to import lazily). Outside code plugs in the
same way or through a ``"package.module:Class"`` spec; see ``docs/aggregators.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from fedtune.aggregators.base import Aggregator
from fedtune.plugins import Registry

A = TypeVar("A", bound=Aggregator)

AGGREGATORS: Registry[Aggregator] = Registry("aggregator", Aggregator)
"""Every selectable aggregator; ``AGGREGATORS.options_of(spec)`` lists a rule's options."""


def register_aggregator(name: str, *, force: bool = False) -> Callable[[type[A]], type[A]]:
    """Class decorator that registers an :class:`Aggregator` under ``name`` and sets ``cls.name``.

    ``name`` is what configs select (``aggregator.name``), kebab-case by convention. A taken name
    raises ``ValueError`` unless ``force``; a non-``Aggregator`` raises ``TypeError``.
    """
    return AGGREGATORS.register(name, force=force)


def available_aggregators() -> list[str]:
    """Registered names, sorted."""
    return AGGREGATORS.available()


def resolve_aggregator(spec: str) -> type[Aggregator]:
    """Return the class for a registered name or a ``"package.module:Class"`` path (``ValueError`` if bad)."""
    return AGGREGATORS.resolve(spec)


def create_aggregator(spec: str, options: Mapping[str, object] | None = None) -> Aggregator:
    """Build the aggregator named by ``spec`` from its ``[aggregator.options]`` table.

    Every option must name a constructor parameter (kebab- or snake_case) and match its
    annotated type, so a typo fails here instead of being ignored; see
    :meth:`fedtune.plugins.Registry.create` for the exact rules.

    Raises
    ------
    ValueError
        For a bad spec, an unknown, mistyped or missing option, or a value the aggregator rejects.
    """
    return AGGREGATORS.create(spec, options)
