"""Benchmarks are scripts in ``benchmarks/``, not a package: a test module names its script in
``BENCHMARK`` and the ``bench`` fixture imports it from there."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench(request: pytest.FixtureRequest) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(str(request.module.BENCHMARK))
    finally:
        sys.path.remove(str(BENCH))
