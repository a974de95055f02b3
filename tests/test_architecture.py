"""The layering the README draws, enforced: only the Flower adapter imports flwr, and no module
imports a layer above its own (imports inside functions and TYPE_CHECKING blocks count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedtune"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fedtune._proto", "fedtune.config", "fedtune.config_toml", "fedtune.plugins", "fedtune.runlog"),
    ("fedtune.wire", "fedtune.assets", "fedtune.secagg"),
    ("fedtune.data",),
    ("fedtune.zo", "fedtune.eval", "fedtune.privacy"),
    ("fedtune.aggregators",),
    ("fedtune.algorithms",),
    ("fedtune.fedkseed", "fedtune.lora", "fedtune.sap"),
    ("fedtune.runtime", "fedtune.experiment", "fedtune.recorder", "fedtune.export"),
    ("fedtune.flower",),
    ("fedtune.cli", "fedtune.asset_report"),
)


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    if module == "fedtune":
        return 0
    raise AssertionError(f"{module} is in no layer; add it to LAYERS (and the README's picture)")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "fedtune")
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_only_the_flower_adapter_imports_flwr(path: Path) -> None:
    name = module_name(path)
    uses_flwr = any(m == "flwr" or m.startswith("flwr.") for m in imports(path))
    assert not uses_flwr or name.startswith("fedtune.flower"), f"{name} imports flwr"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    name = module_name(path)
    own = layer_of(name)
    for target in imports(path):
        if target == "fedtune" or not target.startswith("fedtune."):
            continue
        assert layer_of(target) <= own, f"{name} (layer {own}) imports {target} (layer {layer_of(target)})"


def test_every_package_is_in_a_layer() -> None:
    for path in MODULES:
        layer_of(module_name(path))
