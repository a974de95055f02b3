"""fedtune.plugins.Registry on its own: a dummy base class, lazy built-ins, strict options."""

from __future__ import annotations

import sys
import textwrap
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from fedtune.plugins import REQUIRED, Registry


class Widget(ABC):
    name: ClassVar[str] = ""

    @abstractmethod
    def spin(self) -> int: ...


class Plain(Widget):
    def spin(self) -> int:
        return 0


class Tuned(Widget):
    """A leading positional (filled by *args) then options of every checked kind."""

    def __init__(
        self,
        model: object,
        *,
        steps: int = 3,
        rate: float = 0.5,
        verbose: bool = False,
        mode: str = "fast",
        limit: int | None = None,
        extra: list[int] | None = None,
    ) -> None:
        self.model = model
        self.steps, self.rate, self.verbose, self.mode, self.limit, self.extra = (
            steps,
            rate,
            verbose,
            mode,
            limit,
            extra,
        )

    def spin(self) -> int:
        return self.steps


class Needy(Widget):
    def __init__(self, *, seed: int, depth: int) -> None:
        self.seed, self.depth = seed, depth

    def spin(self) -> int:
        return self.seed


class Fussy(Widget):
    def __init__(self, *, level: int = 0) -> None:
        if level < 0:
            raise ValueError(f"level must be >= 0, got {level}")
        if level == 7:
            raise TypeError("seven is unlucky")
        if level == 9:
            raise RuntimeError("a bug, not a config error")

    def spin(self) -> int:
        return 0


class Unresolvable(Widget):
    """``Missing`` is not defined anywhere, so get_type_hints fails and the raw text is used."""

    def __init__(self, *, count: int = 1, thing: Missing | None = None) -> None:  # type: ignore[name-defined]  # noqa: F821
        self.count, self.thing = count, thing

    def spin(self) -> int:
        return self.count


class Swallower(Widget):
    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs

    def spin(self) -> int:
        return 0


class PositionalOnly(Widget):
    def __init__(self, a: int, /, *, b: int = 0) -> None:
        self.a, self.b = a, b

    def spin(self) -> int:
        return self.a


@pytest.fixture
def reg() -> Registry[Widget]:
    return Registry("widget", Widget)


@pytest.fixture
def widget_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package ``<pkg>`` with ``registry.py`` (a Registry with lazy built-ins) and ``impl.py``."""
    package = f"widgets_{uuid.uuid4().hex[:8]}"
    root = tmp_path / package
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "registry.py").write_text(
        textwrap.dedent(
            f"""
            from fedtune.plugins import Registry
            from {__name__} import Widget

            WIDGETS = Registry(
                "widget",
                Widget,
                builtins={{
                    "fancy": "{package}.impl:Fancy",
                    "quiet": "{package}.impl:Quiet",
                    "gone": "{package}.nowhere:Gone",
                }},
            )
            """
        )
    )
    (root / "impl.py").write_text(
        textwrap.dedent(
            f"""
            from {package}.registry import WIDGETS
            from {__name__} import Widget

            @WIDGETS.register("fancy")
            class Fancy(Widget):
                def __init__(self, *, size: int = 1) -> None:
                    self.size = size

                def spin(self) -> int:
                    return self.size

            class Quiet(Widget):  # a built-in that does not register itself
                def spin(self) -> int:
                    return 0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[name]


def _widgets(package: str) -> Registry[Widget]:
    module = __import__(f"{package}.registry", fromlist=["WIDGETS"])
    registry: Registry[Widget] = module.WIDGETS
    return registry


# --- register -------------------------------------------------------------------------------------


def test_register_sets_name_and_returns_the_class(reg: Registry[Widget]) -> None:
    class Named(Plain):
        pass

    cls = Named
    assert reg.register("named")(cls) is cls
    assert cls.name == "named"
    assert reg.available() == ["named"]
    assert reg.resolve("named") is cls
    assert reg.register("named")(cls) is cls  # the same class again is a no-op


def test_register_refuses_bad_input(reg: Registry[Widget]) -> None:
    for bad in ("", "a:b"):
        with pytest.raises(ValueError, match=r"widget name must be non-empty and contain no ':'"):
            reg.register(bad)
    with pytest.raises(TypeError, match=r"registering widget 'x' needs a Widget subclass, got <class 'int'>"):
        reg.register("x")(int)
    declared = type("Declared", (Plain,), {"name": "declared"})
    with pytest.raises(ValueError, match=r"declares name='declared' but is registered as 'other'"):
        reg.register("other")(declared)


def test_duplicates_name_both_classes_unless_forced(reg: Registry[Widget]) -> None:
    first, second = type("First", (Plain,), {}), type("Second", (Plain,), {})
    reg.register("w")(first)
    with pytest.raises(ValueError, match=r"'w' is already registered to .*First, so .*Second cannot take it"):
        reg.register("w")(second)
    reg.register("w", force=True)(second)
    assert reg.resolve("w") is second


def test_builtin_specs_are_checked() -> None:
    with pytest.raises(ValueError, match=r"spec 'no_colon' must look like 'package\.module:Class'"):
        Registry("widget", Widget, builtins={"w": "no_colon"})
    with pytest.raises(ValueError, match="non-empty and contain no ':'"):
        Registry("widget", Widget, builtins={"a:b": "m:C"})


# --- lazy built-ins -------------------------------------------------------------------------------


def test_builtins_are_listed_without_importing(widget_package: str) -> None:
    widgets = _widgets(widget_package)
    assert widgets.available() == ["fancy", "gone", "quiet"]
    assert f"{widget_package}.impl" not in sys.modules


def test_self_registering_builtin_is_not_a_duplicate(widget_package: str) -> None:
    widgets = _widgets(widget_package)
    fancy = widgets.resolve("fancy")
    assert fancy.__name__ == "Fancy" and fancy.name == "fancy"
    assert widgets.resolve("fancy") is fancy
    assert widgets.create("fancy", {"size": 4}).spin() == 4


def test_builtin_without_decorator_is_registered_on_resolve(widget_package: str) -> None:
    widgets = _widgets(widget_package)
    quiet = widgets.resolve("quiet")
    assert quiet.name == "quiet"
    assert widgets.resolve("quiet") is quiet


def test_builtin_name_is_taken_before_its_import(widget_package: str) -> None:
    widgets = _widgets(widget_package)
    with pytest.raises(
        ValueError, match=rf"'fancy' is already registered to the built-in {widget_package}\.impl:Fancy"
    ):
        widgets.register("fancy")(type("Impostor", (Plain,), {}))


def test_forced_override_survives_the_builtin_import(widget_package: str) -> None:
    widgets = _widgets(widget_package)
    mine = widgets.register("fancy", force=True)(type("Mine", (Plain,), {}))
    __import__(f"{widget_package}.impl")  # the built-in's decorator runs now, after the override
    assert widgets.resolve("fancy") is mine


def test_missing_builtin_module_is_explained(widget_package: str) -> None:
    with pytest.raises(
        ValueError, match=r"widget 'gone' is built in, but its module .*nowhere' cannot be imported"
    ):
        _widgets(widget_package).resolve("gone")


# --- resolve --------------------------------------------------------------------------------------


def test_resolve_paths_and_errors(reg: Registry[Widget]) -> None:
    assert reg.resolve(f"{__name__}:Plain") is Plain
    cases = {
        "nope": r"unknown widget 'nope'; registered: \. For your own class use 'package\.module:Class'",
        f"{__name__}:Widget": r"is abstract; implement \['spin'\]",
        "collections:OrderedDict": r"not a Widget subclass; subclass test_plugins\.Widget",
        f"{__name__}:Nothing": r"has no attribute 'Nothing' \(widget '",
        "no_such_mod_q:Thing": r"cannot import module 'no_such_mod_q' for widget 'no_such_mod_q:Thing'",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            reg.resolve(spec)


# --- create and options_of ------------------------------------------------------------------------


def test_args_fill_leading_parameters_and_options_the_rest(reg: Registry[Widget]) -> None:
    reg.register("tuned")(Tuned)
    model = object()
    tuned = reg.create("tuned", {"steps": 5, "rate": 1, "verbose": True, "mode": "slow", "limit": 2}, model)
    assert isinstance(tuned, Tuned)
    assert (tuned.model, tuned.steps, tuned.rate, tuned.verbose, tuned.mode, tuned.limit) == (
        model,
        5,
        1.0,
        True,
        "slow",
        2,
    )
    assert isinstance(tuned.rate, float)
    assert reg.create("tuned", {"limit": None, "extra": ["unchecked"]}, model).extra == ["unchecked"]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"takes no option 'model'; its options are: steps, rate, verbose"):
        reg.create("tuned", {"model": 1}, model)
    with pytest.raises(TypeError, match=r"cannot take 2 positional arguments"):
        reg.create("tuned", None, model, model)


def test_options_of_lists_kebab_names_and_defaults(reg: Registry[Widget]) -> None:
    reg.register("needy")(Needy)
    assert reg.options_of("needy") == {"seed": REQUIRED, "depth": REQUIRED}
    assert repr(REQUIRED) == "<required>"
    assert reg.options_of(f"{__name__}:Tuned", num_args=1) == {
        "steps": 3,
        "rate": 0.5,
        "verbose": False,
        "mode": "fast",
        "limit": None,
        "extra": None,
    }
    assert next(iter(reg.options_of(f"{__name__}:Tuned"))) == "model"
    assert reg.options_of(f"{__name__}:Plain") == {}


def test_kebab_keys_are_converted() -> None:
    class Snake(Plain):
        def __init__(self, *, max_iter: int = 10, warm_start: bool = False) -> None:
            self.max_iter, self.warm_start = max_iter, warm_start

    reg: Registry[Widget] = Registry("widget", Widget)
    reg.register("snake")(Snake)
    snake = reg.create("snake", {"max-iter": 20, "warm_start": True})
    assert isinstance(snake, Snake) and (snake.max_iter, snake.warm_start) == (20, True)
    assert reg.options_of("snake") == {"max-iter": 10, "warm-start": False}
    with pytest.raises(
        ValueError,
        match=r"^widget 'snake' takes no option 'max-iters'; its options are: max-iter, warm-start$",
    ):
        reg.create("snake", {"max-iters": 20})
    with pytest.raises(ValueError, match="option 'max-iter' is given twice"):
        reg.create("snake", {"max-iter": 1, "max_iter": 2})
    with pytest.raises(ValueError, match="option names must be non-empty strings, got 3"):
        reg.create("snake", {3: 1})  # type: ignore[dict-item]


def test_no_options_and_var_keyword_take_none(reg: Registry[Widget]) -> None:
    for cls in (Plain, Swallower):
        with pytest.raises(ValueError, match=r"takes no option 'x'; it takes no options$"):
            reg.create(f"{__name__}:{cls.__name__}", {"x": 1})
    assert isinstance(reg.create(f"{__name__}:Swallower"), Swallower)


def test_option_types_are_checked(reg: Registry[Widget]) -> None:
    spec = f"{__name__}:Tuned"
    cases: list[tuple[dict[str, object], str]] = [
        ({"steps": "3"}, r"option 'steps' must be an int, got '3' \(str\)"),
        ({"steps": True}, r"option 'steps' must be an int, got True \(bool\)"),
        ({"steps": 2.0}, r"option 'steps' must be an int, got 2\.0 \(float\)"),
        ({"rate": False}, r"option 'rate' must be a float, got False \(bool\)"),
        ({"rate": "0.1"}, r"option 'rate' must be a float"),
        ({"verbose": 1}, r"option 'verbose' must be a bool, got 1 \(int\)"),
        ({"mode": 3}, r"option 'mode' must be a str, got 3 \(int\)"),
        ({"limit": "2"}, r"option 'limit' must be an int or none, got '2' \(str\)"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=rf"^widget '{spec}' {message}"):
            reg.create(spec, options, None)


def test_unresolvable_annotations_fall_back_to_their_text(reg: Registry[Widget]) -> None:
    spec = f"{__name__}:Unresolvable"
    with pytest.raises(ValueError, match=r"option 'count' must be an int"):
        reg.create(spec, {"count": "1"})
    made = reg.create(spec, {"count": 2, "thing": "anything"})  # an unknown type is not checked
    assert made.spin() == 2


def test_required_options_name_the_config_table(reg: Registry[Widget]) -> None:
    reg.register("needy")(Needy)
    with pytest.raises(
        ValueError, match=r"^widget 'needy' requires options 'seed', 'depth'; set them in \[widget\.options\]"
    ):
        reg.create("needy")
    with pytest.raises(ValueError, match=r"requires option 'depth'; set it in \[widget\.options\]"):
        reg.create("needy", {"seed": 1})
    assert reg.create("needy", {"seed": 1, "depth": 2}).spin() == 1
    with pytest.raises(ValueError, match=r"requires positional-only \['a'\], which options cannot supply"):
        reg.create(f"{__name__}:PositionalOnly", {"b": 1})
    assert reg.create(f"{__name__}:PositionalOnly", {"b": 1}, 5).spin() == 5


def test_constructor_errors_become_value_errors_with_the_class_name(reg: Registry[Widget]) -> None:
    spec = f"{__name__}:Fussy"
    with pytest.raises(ValueError, match=r"^Fussy: level must be >= 0, got -1$") as info:
        reg.create(spec, {"level": -1})
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ValueError, match=r"^Fussy: seven is unlucky$") as info:
        reg.create(spec, {"level": 7})
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(RuntimeError, match="a bug"):  # not a config error: left alone
        reg.create(spec, {"level": 9})
