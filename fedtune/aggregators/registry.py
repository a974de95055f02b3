"""Name -> aggregator class registry, plus ``"package.module:Class"`` loading for outside code.

The registry is open (no enum) so research code can add rules without editing fedtune, and it
refuses silent overwrites so two plugins cannot shadow each other by accident.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from fedtune.aggregators.base import Aggregator

A = TypeVar("A", bound=Aggregator)

_REGISTRY: dict[str, type[Aggregator]] = {}

_IMPORT_HINT = (
    "make sure it is importable, e.g. run from the directory that contains the package "
    "or add that directory to PYTHONPATH"
)


def register_aggregator(name: str, *, force: bool = False) -> Callable[[type[A]], type[A]]:
    """Class decorator that registers an :class:`Aggregator` under ``name`` and sets ``cls.name``.

    Parameters
    ----------
    name:
        The name selected in configs (``aggregator.name``); kebab-case by convention.
    force:
        Replace an existing registration instead of raising.

    Raises
    ------
    ValueError
        If ``name`` is empty, contains ``":"``, or is taken (and ``force`` is false).
    TypeError
        If the decorated object is not an ``Aggregator`` subclass.
    """
    if not name or ":" in name:
        raise ValueError(f"aggregator name must be non-empty and contain no ':', got {name!r}")

    def decorate(cls: type[A]) -> type[A]:
        if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
            raise TypeError(f"@register_aggregator({name!r}) needs an Aggregator subclass, got {cls!r}")
        if name in _REGISTRY and not force:
            raise ValueError(
                f"aggregator {name!r} is already registered to {_qualname(_REGISTRY[name])}; "
                "pick another name or pass force=True to replace it"
            )
        own = cls.__dict__.get("name")
        if own and own != name:
            raise ValueError(f"{_qualname(cls)} declares name={own!r} but is registered as {name!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_aggregators() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def resolve_aggregator(spec: str) -> type[Aggregator]:
    """Return the class for a registered name or a ``"package.module:Class"`` path.

    Raises
    ------
    ValueError
        If the name is unknown, the module cannot be imported, the attribute is missing, or it is
        not a concrete ``Aggregator`` subclass.
    """
    if ":" not in spec:
        try:
            return _REGISTRY[spec]
        except KeyError:
            raise ValueError(
                f"unknown aggregator {spec!r}; registered: {', '.join(available_aggregators())}. "
                "For your own class use 'package.module:Class'"
            ) from None
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"aggregator spec {spec!r} must look like 'package.module:Class'")
    module = _import_module(module_name, spec)
    obj: object = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr_path!r} (aggregator {spec!r})")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Aggregator)):
        raise ValueError(
            f"{spec!r} is {obj!r}, not an Aggregator subclass; "
            "subclass fedtune.aggregators.Aggregator and implement aggregate()"
        )
    if inspect.isabstract(obj):
        raise ValueError(f"{spec!r} is abstract; implement {sorted(obj.__abstractmethods__)}")
    return obj


def create_aggregator(spec: str, **options: float | int) -> Aggregator:
    """Build the aggregator named by ``spec``, passing only the options its constructor declares.

    Parameters
    ----------
    spec:
        A registered name (see :func:`available_aggregators`) or ``"package.module:Class"``. Modules
        are imported with the current working directory first on ``sys.path`` (as ``python -m``
        does), then the usual path (``PYTHONPATH``, site-packages).
    **options:
        Candidate options (the config layer passes ``trim_fraction``, ``num_byzantine``,
        ``clip_norm`` and ``krum_select``). Each is passed on only if ``__init__`` names it, so an
        aggregator takes what it needs; the rest are ignored.

    Raises
    ------
    ValueError
        For a bad spec (see :func:`resolve_aggregator`), a required constructor argument that no
        option supplies, or an option value the aggregator rejects.
    """
    cls = resolve_aggregator(spec)
    return cls(**_constructor_kwargs(cls, options))


def _constructor_kwargs(cls: type[Aggregator], options: Mapping[str, float | int]) -> dict[str, float | int]:
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls).parameters.values()
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and not (p.kind in named and p.name in options)
    ]
    if required:
        raise ValueError(
            f"{_qualname(cls)}.__init__ requires {required}, which the config cannot supply "
            f"(it provides {sorted(options)}); give those parameters defaults"
        )
    accepted = {p.name for p in params if p.kind in named}
    return {key: value for key, value in options.items() if key in accepted}


def _import_module(module_name: str, spec: str) -> object:
    cwd = os.getcwd()
    # Like ``python -m`` and Flower's app loading, the working directory goes first for this import:
    # console scripts (``fedtune simulate``) leave it off sys.path, and a same-named package in
    # site-packages would otherwise win (the opacus 1.6 wheel installs a top-level ``examples``).
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} for aggregator {spec!r} ({exc}); "
            f"{_IMPORT_HINT}{_shadow_hint(module_name, cwd)}"
        ) from exc
    finally:
        if sys.path and sys.path[0] == cwd:
            del sys.path[0]
        elif cwd in sys.path:
            sys.path.remove(cwd)


def _shadow_hint(module_name: str, cwd: str) -> str:
    """Say where the top-level package came from when only a submodule was missing."""
    top = module_name.partition(".")[0]
    origin = getattr(sys.modules.get(top), "__file__", None)
    if top == module_name or origin is None:
        return ""
    local = Path(cwd) / top
    if local.exists() and not Path(origin).is_relative_to(local):
        return (
            f". Note: {top!r} is already imported from {origin}, which shadows {local}; "
            "rename your top-level package to something unique"
        )
    return f". Note: {top!r} was found at {origin}"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
