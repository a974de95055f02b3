"""Builtin pretrained models and corpora shipped as PyPI wheels, found and loaded fully offline.

Exports resolve lazily (PEP 562): ``fedtune.assets.locate`` stays importable without transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.assets.device import resolve_device
    from fedtune.assets.locate import ASSET_PACKAGES, AssetMissingError, AssetPackage, asset_file, package_dir
    from fedtune.assets.models import (
        BUILTIN_MODELS,
        BuiltinModel,
        cache_dir,
        count_parameters,
        load_causal_lm,
        load_encoder,
        load_tokenizer,
        resolve_model_dir,
        tiny_causal_lm,
    )

_EXPORTS = {
    "ASSET_PACKAGES": "locate",
    "AssetMissingError": "locate",
    "AssetPackage": "locate",
    "asset_file": "locate",
    "package_dir": "locate",
    "BUILTIN_MODELS": "models",
    "BuiltinModel": "models",
    "cache_dir": "models",
    "count_parameters": "models",
    "load_causal_lm": "models",
    "load_encoder": "models",
    "load_tokenizer": "models",
    "resolve_model_dir": "models",
    "tiny_causal_lm": "models",
    "resolve_device": "device",
}

__all__ = [
    "ASSET_PACKAGES",
    "BUILTIN_MODELS",
    "AssetMissingError",
    "AssetPackage",
    "BuiltinModel",
    "asset_file",
    "cache_dir",
    "count_parameters",
    "load_causal_lm",
    "load_encoder",
    "load_tokenizer",
    "package_dir",
    "resolve_device",
    "resolve_model_dir",
    "tiny_causal_lm",
]


def __getattr__(name: str) -> Any:
    submodule = _EXPORTS.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value
    return value
