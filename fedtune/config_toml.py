"""The serialized forms of a run config: TOML tables, dotted keys, ``--set`` overrides.

:class:`fedtune.config.RunConfig` is the source of truth; this module only turns its sections into
kebab-case keys and back, type-checking every value (TOML and Flower's run config keep ints and
floats apart, so an int is accepted where a float is expected and nothing looser).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_type_hints

Scalar = bool | int | float | str
T = TypeVar("T")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> dotted keys, the way Flower flattens run configs."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> Scalar:
    """A ``--set`` value: a TOML scalar (``1e-6``, ``true``, ``'x'``), else the bare string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if not isinstance(value, bool | int | float | str):
        raise ValueError(f"--set values must be TOML scalars, got {text!r}")
    return value


def parse_overrides(pairs: Sequence[str]) -> dict[str, Scalar]:
    """``["zo.lr=1e-6", "run.name='x'"]`` -> dotted overrides (ValueError for a pair without ``=``)."""
    out: dict[str, Scalar] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value (e.g. --set zo.lr=1e-6), got {pair!r}")
        out[key.strip()] = parse_override(value.strip())
    return out


def toml_value(value: Scalar) -> str:
    """``value`` as a TOML scalar that :func:`tomllib.loads` reads back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def section_from(base: T, section: str, values: Mapping[str, Any]) -> T:
    """``base`` (a section dataclass) with the kebab-case ``values`` of ``[section]`` applied."""
    hints = get_type_hints(type(base))
    fields = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    options: dict[str, Scalar] = {}
    for raw_key, value in values.items():
        if raw_key.startswith("options.") and "options" in fields:
            options[raw_key.removeprefix("options.")] = _option_value(f"{section}.{raw_key}", value)
            continue
        name = raw_key.replace("-", "_")
        if name not in fields or raw_key != name.replace("_", "-"):
            known = ", ".join(sorted(f.replace("_", "-") for f in fields))
            raise ValueError(f"unknown config key '{section}.{raw_key}'; known keys in [{section}]: {known}")
        kwargs[name] = _coerce(f"{section}.{raw_key}", hints[name], value)
    if options:
        merged = {**dict(getattr(base, "options")), **options}  # noqa: B009
        kwargs["options"] = tuple(sorted(merged.items()))
    return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]


def _option_value(key: str, value: Any) -> Scalar:
    if not isinstance(value, bool | int | float | str):
        raise ValueError(f"{key} must be a bool, int, float or string, got {type(value).__name__}")
    return value


def _coerce(key: str, hint: Any, value: Any) -> Scalar:
    # TOML and Flower's run config keep ints and floats apart; accept an int where a float is
    # expected (lr = 1 is fine), nothing looser.
    if isinstance(hint, types.UnionType):
        raise TypeError(f"unsupported config type for {key}")
    is_bool = isinstance(value, bool)
    if (hint is bool and is_bool) or (hint is int and isinstance(value, int) and not is_bool):
        return value  # type: ignore[no-any-return]
    if hint is float and isinstance(value, int | float) and not is_bool:
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if key.endswith(".options"):
        raise ValueError(f"{key} is a table: write [{key}] in TOML or dotted keys {key}.<name>")
    raise ValueError(f"{key} must be of type {hint.__name__}, got {type(value).__name__} {value!r}")
