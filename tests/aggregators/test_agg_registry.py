"""Registration, name and "package.module:Class" resolution, and option filtering."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fedtune.aggregators import (
    DEFAULT_AGGREGATOR,
    Aggregator,
    ClientUpdate,
    GlobalUpdate,
    MultiKrum,
    TrimmedMean,
    available_aggregators,
    create_aggregator,
    register_aggregator,
    registry,
    resolve_aggregator,
)

CONFIG_OPTIONS: dict[str, float | int] = {
    "trim_fraction": 0.2,
    "num_byzantine": 1,
    "clip_norm": 0.0,
    "krum_select": 2,
}

PLUGIN_SOURCE = textwrap.dedent(
    """
    from fedtune.aggregators import Aggregator, UpdateBatch

    class Plugin(Aggregator):
        def __init__(self, *, clip_norm: float = 1.0, extra: str = "kept") -> None:
            self.clip_norm = clip_norm
            self.extra = extra

        def aggregate(self, server_round, updates):
            batch = UpdateBatch(updates, aggregator="plugin", server_round=server_round)
            return batch.to_global({n: batch.stack(n).sum(axis=0) for n in batch.names})

    class NeedsSecret(Aggregator):
        def __init__(self, secret: str) -> None:
            self.secret = secret

        def aggregate(self, server_round, updates):
            raise NotImplementedError

    class Abstract(Aggregator):
        pass

    NOT_A_CLASS = 3
    """
)


class _Stub(Aggregator):
    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        raise NotImplementedError


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.fixture
def plugin_module(tmp_path: Path) -> Iterator[str]:
    """A uniquely named package ``<pkg>.aggs`` holding PLUGIN_SOURCE; yields ``<pkg>.aggs``."""
    package = f"user_research_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "aggs.py").write_text(PLUGIN_SOURCE)
    yield f"{package}.aggs"
    for name in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[name]


def test_builtins_are_registered_and_sorted() -> None:
    names = available_aggregators()
    assert names == sorted(names)
    assert {"weighted-mean", "median", "trimmed-mean", "clipped-mean", "krum", "multi-krum"} <= set(names)
    assert DEFAULT_AGGREGATOR in names


def test_register_sets_name_and_rejects_duplicates() -> None:
    register_aggregator("stub")(_Stub)
    assert _Stub.name == "stub"
    assert "stub" in available_aggregators()
    with pytest.raises(ValueError, match=r"'stub' is already registered.*force=True"):
        register_aggregator("stub")(type("Other", (_Stub,), {}))
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator("median")(_Stub)


def test_force_replaces_a_registration() -> None:
    replacement: type[Aggregator] = register_aggregator("median", force=True)(type("MyMedian", (_Stub,), {}))
    assert resolve_aggregator("median") is replacement


def test_register_rejects_bad_names_and_non_aggregators() -> None:
    for bad in ("", "pkg:Cls"):
        with pytest.raises(ValueError, match="non-empty and contain no ':'"):
            register_aggregator(bad)
    with pytest.raises(TypeError, match="needs an Aggregator subclass"):
        register_aggregator("not-one")(dict)  # type: ignore[type-var]
    declared = type("Declared", (_Stub,), {"name": "declared"})
    with pytest.raises(ValueError, match="declares name='declared' but is registered as 'other'"):
        register_aggregator("other")(declared)


def test_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown aggregator 'fedmedian'; registered: .*median.*package\.module:Class"
    ):
        create_aggregator("fedmedian")


def test_options_are_filtered_to_the_constructor_signature() -> None:
    trimmed = create_aggregator("trimmed-mean", **CONFIG_OPTIONS)
    assert trimmed == TrimmedMean(trim_fraction=0.2)
    multi = create_aggregator("multi-krum", **CONFIG_OPTIONS)
    assert multi == MultiKrum(num_byzantine=1, krum_select=2)
    assert create_aggregator("median", **CONFIG_OPTIONS).name == "median"


def test_option_values_are_still_validated() -> None:
    with pytest.raises(ValueError, match=r"aggregator\.trim-fraction"):
        create_aggregator("trimmed-mean", **{**CONFIG_OPTIONS, "trim_fraction": 0.6})


def test_dotted_spec_loads_from_sys_path(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    agg = create_aggregator(f"{plugin_module}:Plugin", **CONFIG_OPTIONS)
    assert type(agg).__name__ == "Plugin"
    assert (agg.clip_norm, agg.extra) == (0.0, "kept")  # type: ignore[attr-defined]
    assert isinstance(agg, Aggregator)


def test_dotted_spec_loads_from_working_directory(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Console scripts do not put the working directory on sys.path; resolution must still find it.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert type(create_aggregator(f"{plugin_module}:Plugin")).__name__ == "Plugin"
    assert sys.path == before  # the working directory was added for the import only


def test_working_directory_beats_a_same_named_installed_package(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed package with the same top-level name but without the submodule (as opacus ships
    # a top-level ``examples``) sits on sys.path; the project copy in the working directory must win.
    package = plugin_module.partition(".")[0]
    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.chdir(tmp_path)
    assert type(create_aggregator(f"{plugin_module}:Plugin")).__name__ == "Plugin"


def test_already_imported_shadowing_package_is_explained(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = plugin_module.partition(".")[0]
    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    importlib.import_module(package)  # the installed copy is imported first and cached
    monkeypatch.chdir(tmp_path)
    shadowed = rf"'{package}' is already imported from .*site.*rename your top-level"
    with pytest.raises(ValueError, match=shadowed):
        create_aggregator(f"{plugin_module}:Plugin")


def test_dotted_spec_errors_are_clear(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "no_such_package_xyz.aggs:Plugin": r"cannot import module 'no_such_package_xyz\.aggs'.*PYTHONPATH",
        f"{plugin_module}:Missing": r"has no attribute 'Missing'",
        f"{plugin_module}:NOT_A_CLASS": r"is 3, not an Aggregator subclass",
        "collections:OrderedDict": r"not an Aggregator subclass",
        f"{plugin_module}:Abstract": r"is abstract; implement \['aggregate'\]",
        f"{plugin_module}:NeedsSecret": r"requires \['secret'\], which the config cannot supply",
        ":Plugin": r"must look like 'package\.module:Class'",
        f"{plugin_module}:": r"must look like 'package\.module:Class'",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            create_aggregator(spec, **CONFIG_OPTIONS)


def test_constructor_without_options_gets_none() -> None:
    class Bare(_Stub):
        pass

    register_aggregator("bare")(Bare)
    assert isinstance(create_aggregator("bare", **CONFIG_OPTIONS), Bare)
