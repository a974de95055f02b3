"""Registration, name and "package.module:Class" resolution, and strict option checking."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fedtune.aggregators import (
    AGGREGATORS,
    DEFAULT_AGGREGATOR,
    Aggregator,
    ClientUpdate,
    GlobalUpdate,
    Krum,
    MultiKrum,
    TrimmedMean,
    available_aggregators,
    create_aggregator,
    register_aggregator,
    resolve_aggregator,
)

PLUGIN_SOURCE = textwrap.dedent(
    """
    from fedtune.aggregators import Aggregator, UpdateBatch, register_aggregator

    class Plugin(Aggregator):
        def __init__(self, *, clip_norm: float = 1.0, extra: str = "kept") -> None:
            self.clip_norm = clip_norm
            self.extra = extra

        def aggregate(self, server_round, updates):
            batch = UpdateBatch(updates, aggregator="plugin", server_round=server_round)
            return batch.to_global({n: batch.stack(n).sum(axis=0) for n in batch.names})

    class Iterative(Plugin):
        def __init__(self, *, max_iter: int = 10) -> None:
            super().__init__()
            self.max_iter = max_iter

    class NeedsSecret(Plugin):
        def __init__(self, secret: str) -> None:
            super().__init__()
            self.secret = secret

    class Picky(Plugin):
        def __init__(self, *, level: int = 0) -> None:
            if level > 3:
                raise ValueError(f"level must be <= 3, got {level}")
            super().__init__()

    @register_aggregator("lazy-plugin")
    class SelfRegistered(Plugin):
        pass

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
    """Registrations (and built-in entries) made by a test vanish after it."""
    monkeypatch.setattr(AGGREGATORS, "_registered", dict(AGGREGATORS._registered))
    monkeypatch.setattr(AGGREGATORS, "_builtins", dict(AGGREGATORS._builtins))


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


# --- registration ---------------------------------------------------------------------------------


def test_builtins_are_registered_and_sorted() -> None:
    names = available_aggregators()
    assert names == sorted(names)
    assert {"weighted-mean", "median", "trimmed-mean", "clipped-mean", "krum", "multi-krum"} <= set(names)
    assert DEFAULT_AGGREGATOR in names


def test_register_sets_name_and_rejects_duplicates() -> None:
    register_aggregator("stub")(_Stub)
    assert _Stub.name == "stub"
    assert "stub" in available_aggregators()
    register_aggregator("stub")(_Stub)  # the same class again is a no-op
    other = type("Other", (_Stub,), {})
    both = rf"'stub' is already registered to {__name__}\._Stub, so .*\.Other cannot take it.*force=True"
    with pytest.raises(ValueError, match=both):
        register_aggregator("stub")(other)
    with pytest.raises(
        ValueError, match=r"'median' is already registered to fedtune\.aggregators\.median\.Median"
    ):
        register_aggregator("median")(other)


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


def test_lazy_builtin_is_imported_on_first_resolve(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a built-in whose module registers it itself, and one whose module does not.
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(AGGREGATORS._builtins, "lazy-plugin", f"{plugin_module}:SelfRegistered")
    monkeypatch.setitem(AGGREGATORS._builtins, "lazy-bare", f"{plugin_module}:Iterative")
    # Execute / Assert
    assert {"lazy-plugin", "lazy-bare"} <= set(available_aggregators())
    assert plugin_module not in sys.modules  # listing it imported nothing
    agg = create_aggregator("lazy-plugin", {"clip-norm": 2.0})
    assert type(agg).__name__ == "SelfRegistered"
    assert agg.name == "lazy-plugin"
    assert resolve_aggregator("lazy-plugin") is type(agg)  # registered once, no "duplicate"
    assert resolve_aggregator("lazy-bare").name == "lazy-bare"


# --- names and paths ------------------------------------------------------------------------------


def test_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown aggregator 'fedmedian'; registered: .*median.*package\.module:Class"
    ):
        create_aggregator("fedmedian")


def test_dotted_spec_loads_from_sys_path(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    agg = create_aggregator(f"{plugin_module}:Plugin", {"clip-norm": 0})
    assert type(agg).__name__ == "Plugin"
    assert (agg.clip_norm, agg.extra) == (0.0, "kept")  # type: ignore[attr-defined]
    assert isinstance(agg.clip_norm, float)  # type: ignore[attr-defined]
    assert isinstance(agg, Aggregator)


def test_outside_class_takes_its_own_option(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = f"{plugin_module}:Iterative"
    assert create_aggregator(spec, {"max-iter": 20}).max_iter == 20  # type: ignore[attr-defined]
    assert create_aggregator(spec).max_iter == 10  # type: ignore[attr-defined]
    assert AGGREGATORS.options_of(spec) == {"max-iter": 10}
    with pytest.raises(ValueError, match=r"option 'max-iter' must be an int, got 2\.5 \(float\)"):
        create_aggregator(spec, {"max-iter": 2.5})


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
        ":Plugin": r"must look like 'package\.module:Class'",
        f"{plugin_module}:": r"must look like 'package\.module:Class'",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            create_aggregator(spec)


# --- options --------------------------------------------------------------------------------------


def test_builtin_options_are_listed_with_defaults() -> None:
    assert AGGREGATORS.options_of("multi-krum") == {"num-byzantine": 0, "krum-select": 0}
    assert AGGREGATORS.options_of("trimmed-mean") == {"trim-fraction": 0.1}
    assert AGGREGATORS.options_of("median") == {}


def test_kebab_and_snake_case_keys_both_work() -> None:
    assert create_aggregator("trimmed-mean", {"trim-fraction": 0.2}) == TrimmedMean(trim_fraction=0.2)
    assert create_aggregator("trimmed-mean", {"trim_fraction": 0.2}) == TrimmedMean(trim_fraction=0.2)
    multi = create_aggregator("multi-krum", {"num-byzantine": 1, "krum-select": 2})
    assert multi == MultiKrum(num_byzantine=1, krum_select=2)
    assert create_aggregator("krum", None) == Krum()
    with pytest.raises(ValueError, match="option 'trim-fraction' is given twice"):
        create_aggregator("trimmed-mean", {"trim-fraction": 0.2, "trim_fraction": 0.3})


def test_unknown_option_lists_the_accepted_ones() -> None:
    with pytest.raises(
        ValueError, match=r"^aggregator 'krum' takes no option 'max-iter'; its options are: num-byzantine$"
    ):
        create_aggregator("krum", {"max-iter": 3})
    with pytest.raises(
        ValueError,
        match=r"takes no options 'clip-norm', 'trim-fraction'; its options are: num-byzantine, krum-select",
    ):
        create_aggregator("multi-krum", {"trim_fraction": 0.1, "clip-norm": 1.0, "num-byzantine": 1})
    with pytest.raises(
        ValueError, match=r"aggregator 'median' takes no option 'num-byzantine'; it takes no options"
    ):
        create_aggregator("median", {"num-byzantine": 1})


def test_option_types_are_checked() -> None:
    cases: dict[str, tuple[dict[str, object], str]] = {
        "krum": ({"num-byzantine": "1"}, r"option 'num-byzantine' must be an int, got '1' \(str\)"),
        "multi-krum": ({"krum-select": True}, r"option 'krum-select' must be an int, got True \(bool\)"),
        "trimmed-mean": ({"trim-fraction": "0.1"}, r"option 'trim-fraction' must be a float, got '0\.1'"),
        "clipped-mean": ({"clip-norm": False}, r"option 'clip-norm' must be a float, got False \(bool\)"),
    }
    for name, (options, message) in cases.items():
        with pytest.raises(ValueError, match=rf"^aggregator '{name}' {message}"):
            create_aggregator(name, options)
    clipped = create_aggregator("clipped-mean", {"clip-norm": 2})  # an int is fine for a float
    assert clipped.clip_norm == 2.0 and isinstance(clipped.clip_norm, float)  # type: ignore[attr-defined]


def test_required_parameter_names_the_config_table(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = f"{plugin_module}:NeedsSecret"
    with pytest.raises(ValueError, match=r"requires option 'secret'; set it in \[aggregator\.options\]"):
        create_aggregator(spec)
    assert create_aggregator(spec, {"secret": "s3"}).secret == "s3"  # type: ignore[attr-defined]


def test_constructor_errors_carry_the_class_name(
    plugin_module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ValueError, match=r"^TrimmedMean: trim_fraction \(aggregator\.options\.trim-fraction\)"
    ):
        create_aggregator("trimmed-mean", {"trim-fraction": 0.6})
    with pytest.raises(ValueError, match=r"^Krum: num_byzantine .* must be an integer >= 0, got -1"):
        create_aggregator("krum", {"num-byzantine": -1})
    with pytest.raises(ValueError, match=r"^Picky: level must be <= 3, got 4"):
        create_aggregator(f"{plugin_module}:Picky", {"level": 4})


def test_constructor_without_parameters_takes_no_options() -> None:
    class Bare(_Stub):
        pass

    register_aggregator("bare")(Bare)
    assert isinstance(create_aggregator("bare"), Bare)
    assert isinstance(create_aggregator("bare", {}), Bare)
    with pytest.raises(ValueError, match="it takes no options"):
        create_aggregator("bare", {"num-byzantine": 0})
