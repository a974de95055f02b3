"""Every runtime test starts from freshly loaded models."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh(fresh_models: None) -> None:
    return None
