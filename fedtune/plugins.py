"""A generic name -> class registry for fedtune's extension points (aggregators, algorithms).

One implementation so every extension point behaves the same: names are open (no enum) so
research code can plug in without editing fedtune; duplicates are refused so two plugins cannot
shadow each other by accident; ``"package.module:Class"`` loads outside code; and options from a
config table are checked against the constructor, so a typo fails at start-up instead of being
silently ignored. This module is the lowest layer: it imports nothing from fedtune.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Generic, TypeVar

T = TypeVar("T")
C = TypeVar("C", bound=type)

_IMPORT_HINT = (
    "make sure it is importable, e.g. run from the directory that contains the package "
    "or add that directory to PYTHONPATH"
)
_SIMPLE_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class _Required:
    """Type of :data:`REQUIRED`; a named sentinel so help output reads ``<required>``."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Final = _Required()
"""The "default" :meth:`Registry.options_of` reports for an option without one."""


class Registry(Generic[T]):
    """Classes deriving from ``base``, selectable by name or ``"package.module:Class"``.

    Parameters
    ----------
    kind:
        What the classes are, for messages and the config table name (``"aggregator"`` ->
        ``[aggregator.options]``).
    base:
        The class every entry must subclass: ``T`` itself. It is typed ``type`` rather than
        ``type[T]`` because mypy refuses abstract classes there, so declare the instance with its
        type: ``WIDGETS: Registry[Widget] = Registry("widget", Widget)``.
    builtins:
        Name -> ``"package.module:Class"`` specs imported on first :meth:`resolve`, so listing a
        built-in costs nothing (no torch import) until it is used. The spec must name the module
        that *defines* the class (not a re-export): that is how a built-in registering itself
        with :meth:`register` under its own name is told apart from a clash.
    """

    def __init__(self, kind: str, base: type, builtins: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self.base: type = base
        self._registered: dict[str, type[T]] = {}
        self._builtins: dict[str, str] = {}
        for name, spec in (builtins or {}).items():
            self._check_name(name)
            module, _, attr = spec.partition(":")
            if not module or not attr:
                raise ValueError(
                    f"built-in {kind} {name!r}: spec {spec!r} must look like 'package.module:Class'"
                )
            self._builtins[name] = spec

    def register(self, name: str, *, force: bool = False) -> Callable[[C], C]:
        """Class decorator: register the class under ``name`` and set ``cls.name``.

        Registering the same class twice under one name is a no-op.

        Raises
        ------
        ValueError
            If ``name`` is empty or contains ``":"``, is taken by another class (registered or
            built in) and ``force`` is false, or the class declares a different ``name``.
        TypeError
            If the decorated object is not a subclass of ``base``.
        """
        self._check_name(name)

        def decorate(cls: C) -> C:
            if not _is_subclass(cls, self.base):
                base = self.base.__name__
                raise TypeError(
                    f"registering {self.kind} {name!r} needs {_a(base)} {base} subclass, got {cls!r}"
                )
            own = cls.__dict__.get("name")
            if own and own != name:
                raise ValueError(f"{_qualname(cls)} declares name={own!r} but is registered as {name!r}")
            builtin = self._builtins.get(name)
            is_builtin = builtin == f"{cls.__module__}:{cls.__qualname__}"
            existing = self._registered.get(name)
            if existing is not None and existing is not cls and not force:
                if not is_builtin:
                    raise self._duplicate(name, _qualname(existing), cls)
                # The built-in's module was imported after a forced replacement: the replacement stays.
                cls.name = name  # type: ignore[attr-defined]
                return cls
            if existing is None and builtin is not None and not is_builtin and not force:
                raise self._duplicate(name, f"the built-in {builtin}", cls)
            cls.name = name  # type: ignore[attr-defined]
            self._registered[name] = cls
            return cls

        return decorate

    def available(self) -> list[str]:
        """Registered and built-in names, sorted."""
        return sorted(self._registered.keys() | self._builtins.keys())

    def resolve(self, spec: str) -> type[T]:
        """Return the class for a registered or built-in name, or a ``"package.module:Class"`` path.

        A path is imported with the working directory first on ``sys.path`` (as ``python -m``
        does), then the usual path (``PYTHONPATH``, site-packages).

        Raises
        ------
        ValueError
            If the name is unknown, the module cannot be imported, the attribute is missing, or it
            is not a concrete subclass of ``base``.
        """
        if ":" in spec:
            return self._load(spec, spec, cwd_first=True)
        if spec in self._registered:
            return self._registered[spec]
        if spec in self._builtins:
            cls = self._load(self._builtins[spec], spec, cwd_first=False)
            if spec not in self._registered:  # the module did not register it itself
                self.register(spec)(cls)
            return self._registered[spec]
        raise ValueError(
            f"unknown {self.kind} {spec!r}; registered: {', '.join(self.available())}. "
            "For your own class use 'package.module:Class'"
        )

    def create(self, spec: str, options: Mapping[str, object] | None = None, *args: object) -> T:
        """Build ``cls(*args, **options)`` for the class :meth:`resolve` finds, checking every option.

        Parameters
        ----------
        spec:
            A name (see :meth:`available`) or ``"package.module:Class"``.
        options:
            The ``[<kind>.options]`` table. Keys may be kebab-case (TOML) or snake_case; each must be
            a keyword-capable named parameter of ``__init__`` (``**kwargs`` does not count). Values
            for parameters annotated ``int``, ``float``, ``bool`` or ``str`` (or ``X | None``) must
            have that type; an int is accepted, and converted, for a float.
        *args:
            Values for the leading positional parameters, supplied by fedtune rather than the config
            (e.g. a model); they are not options.

        Raises
        ------
        ValueError
            For a bad spec, an unknown or mistyped option, a required parameter nobody supplies, or
            a ``TypeError``/``ValueError`` from the constructor (prefixed with the class name).
        TypeError
            If ``*args`` does not fit the constructor's positional parameters (a caller bug).
        """
        cls = self.resolve(spec)
        params = _option_parameters(cls, len(args), what=f"{self.kind} {spec!r}")
        kwargs = self._check_options(spec, cls, params, _snake_keys(options or {}, self.kind, spec))
        try:
            return cls(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{cls.__name__}: {exc}") from exc

    def options_of(self, spec: str, *, num_args: int = 0) -> dict[str, object]:
        """The options ``spec`` accepts (kebab-case) and their defaults (:data:`REQUIRED` if none).

        ``num_args`` is how many leading positional parameters the caller of :meth:`create` fills.
        """
        params = _option_parameters(self.resolve(spec), num_args, what=f"{self.kind} {spec!r}")
        return {
            _kebab(p.name): REQUIRED if p.default is inspect.Parameter.empty else p.default for p in params
        }

    def _check_options(
        self, spec: str, cls: type[T], params: list[inspect.Parameter], options: dict[str, object]
    ) -> dict[str, object]:
        by_name = {p.name: p for p in params}
        unknown = sorted(_kebab(key) for key in options if key not in by_name)
        if unknown:
            accepted = (
                f"its options are: {', '.join(_kebab(p.name) for p in params)}"
                if params
                else "it takes no options"
            )
            listed = ", ".join(repr(key) for key in unknown)
            plural = "s" if len(unknown) > 1 else ""
            raise ValueError(f"{self.kind} {spec!r} takes no option{plural} {listed}; {accepted}")
        missing = [
            _kebab(p.name) for p in params if p.default is inspect.Parameter.empty and p.name not in options
        ]
        if missing:
            raise ValueError(
                f"{self.kind} {spec!r} requires option{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(m) for m in missing)}; set {'them' if len(missing) > 1 else 'it'} "
                f"in [{self.kind}.options]"
            )
        hints = _type_hints(cls, params)
        return {
            key: _check_type(self.kind, spec, key, value, hints.get(key)) for key, value in options.items()
        }

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"{self.kind} name must be non-empty and contain no ':', got {name!r}")

    def _duplicate(self, name: str, holder: str, cls: type) -> ValueError:
        return ValueError(
            f"{self.kind} {name!r} is already registered to {holder}, so {_qualname(cls)} cannot take it; "
            "pick another name or pass force=True to replace it"
        )

    def _load(self, path: str, spec: str, *, cwd_first: bool) -> type[T]:
        module_name, _, attr_path = path.partition(":")
        if not module_name or not attr_path:
            raise ValueError(f"{self.kind} spec {spec!r} must look like 'package.module:Class'")
        what = f"{self.kind} {spec!r}"
        obj: object = _import_cwd_first(module_name, what) if cwd_first else _import_plain(module_name, what)
        for part in attr_path.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"module {module_name!r} has no attribute {attr_path!r} ({what})")
            obj = getattr(obj, part)
        base = self.base.__name__
        if not _is_subclass(obj, self.base):
            raise ValueError(
                f"{path!r} is {obj!r}, not {_a(base)} {base} subclass; subclass {_qualname(self.base)}"
            )
        if inspect.isabstract(obj):
            raise ValueError(
                f"{path!r} is abstract; implement {sorted(getattr(obj, '__abstractmethods__', ()))}"
            )
        return typing.cast(type[T], obj)


def _import_cwd_first(module_name: str, what: str) -> types.ModuleType:
    """Import ``module_name`` with the working directory first on ``sys.path``, for this import only.

    Like ``python -m`` and Flower's app loading: console scripts (``fedtune simulate``) leave the
    working directory off ``sys.path``, and a same-named package in site-packages would otherwise
    win (the opacus 1.6 wheel installs a top-level ``examples``). ``what`` names the requester in
    the error.

    Raises
    ------
    ValueError
        If the module (or something it imports) is not found, with a hint on shadowing packages.
    """
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} for {what} ({exc}); "
            f"{_IMPORT_HINT}{_shadow_hint(module_name, cwd)}"
        ) from exc
    finally:
        if sys.path and sys.path[0] == cwd:
            del sys.path[0]
        elif cwd in sys.path:
            sys.path.remove(cwd)


def _import_plain(module_name: str, what: str) -> types.ModuleType:
    """Import a built-in's module from the installed fedtune, never from the working directory."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"{what} is built in, but its module {module_name!r} cannot be imported ({exc}); "
            "install the missing dependency"
        ) from exc


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


def _option_parameters(cls: type, num_args: int, *, what: str) -> list[inspect.Parameter]:
    """The constructor parameters options may set: keyword-capable, after the ``num_args`` leading ones.

    Raises ``TypeError`` when ``num_args`` positional values cannot be passed, and ``ValueError``
    when a positional-only parameter is left without a value (options cannot supply it).
    """
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: it takes no options
        return []
    rest: list[inspect.Parameter] = []
    left = num_args
    for p in params:
        if left and p.kind in _POSITIONAL:
            left -= 1
        elif left and p.kind is inspect.Parameter.VAR_POSITIONAL:
            left = 0
        else:
            rest.append(p)
    if left:
        raise TypeError(f"{what} ({_qualname(cls)}) cannot take {num_args} positional arguments")
    unfilled = [p.name for p in rest if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is p.empty]
    if unfilled:
        raise ValueError(
            f"{what} ({_qualname(cls)}) requires positional-only {unfilled}, which options cannot "
            "supply; give those parameters defaults"
        )
    return [p for p in rest if p.kind in _KEYWORD]


def _snake_keys(options: Mapping[str, object], kind: str, spec: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in options.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{kind} {spec!r}: option names must be non-empty strings, got {key!r}")
        snake = key.replace("-", "_")
        if snake in out:
            raise ValueError(f"{kind} {spec!r}: option {_kebab(snake)!r} is given twice")
        out[snake] = value
    return out


def _type_hints(cls: type, params: list[inspect.Parameter]) -> dict[str, object]:
    """Resolved annotations of the option parameters; raw ones where resolution fails."""
    try:
        hints: dict[str, object] = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    except Exception:  # unresolvable forward reference, odd __init__: fall back to the raw text
        hints = {}
    return {p.name: hints.get(p.name, p.annotation) for p in params}


def _simple_type(annotation: object) -> tuple[type | None, bool]:
    """``(int|float|bool|str or None, whether None is allowed)`` for an annotation."""
    if isinstance(annotation, str):  # unresolved: recognise the plain spellings only
        text = annotation.replace(" ", "")
        for none in ("|None", "None|"):
            if none in text:
                simple, _ = _simple_type(text.replace(none, ""))
                return simple, True
        return _SIMPLE_TYPES.get(text), False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1 and len(typing.get_args(annotation)) == 2:
            simple, _ = _simple_type(members[0])
            return simple, True
        return None, False
    if annotation in _SIMPLE_TYPES.values():
        return typing.cast(type, annotation), False
    return None, False


def _check_type(kind: str, spec: str, key: str, value: object, annotation: object) -> object:
    expected, optional = _simple_type(annotation)
    if expected is None or (optional and value is None):
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is not bool and isinstance(value, bool)):
        return value
    wanted = f"{expected.__name__} or none" if optional else expected.__name__
    raise ValueError(
        f"{kind} {spec!r} option {_kebab(key)!r} must be {_a(wanted)} {wanted}, "
        f"got {value!r} ({type(value).__name__})"
    )


def _is_subclass(obj: object, base: type) -> bool:
    return isinstance(obj, type) and issubclass(obj, base)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
