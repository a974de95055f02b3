"""The user-defined aggregator in examples/custom_aggregator/, loaded the way a config loads it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedtune.aggregators import ClientUpdate, create_aggregator, resolve_aggregator
from fedtune.aggregators.conformance import check_aggregator

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC = "examples.custom_aggregator.sign_vote:SignVote"


@pytest.fixture(autouse=True)
def from_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)


def test_example_loads_and_passes_conformance() -> None:
    agg = create_aggregator(SPEC)
    assert type(agg).__name__ == "SignVote"
    assert agg.name == "sign-vote"
    check_aggregator(lambda: create_aggregator(SPEC))


def test_example_rejects_options_it_does_not_take() -> None:
    with pytest.raises(ValueError, match=r"takes no option 'num-byzantine'; it takes no options"):
        create_aggregator(SPEC, {"num-byzantine": 1})


def test_example_majority_vote_by_hand() -> None:
    rows = [[0.5, -1.0, 0.0, 2.0], [0.25, 1.0, 0.0, -2.0], [-8.0, -4.0, 3.0, 0.0]]
    updates = [
        ClientUpdate(node_id=i, num_examples=1, arrays={"coefficients": np.array(r, np.float32)})
        for i, r in enumerate(rows)
    ]
    out = create_aggregator(SPEC).aggregate(1, updates).arrays["coefficients"]
    # signs: (+,+,-) -> +, median|x| = 0.5; (-,+,-) -> -, 1.0; (0,0,+) -> +, 0.0; (+,-,0) tie -> 0.
    np.testing.assert_array_equal(out, [0.5, -1.0, 0.0, 0.0])


def test_simulation_override_selects_the_example() -> None:
    config = tomllib.loads((REPO_ROOT / "simulations" / "custom_aggregator.toml").read_text())
    assert config["aggregator"]["name"] == SPEC
    assert resolve_aggregator(config["aggregator"]["name"]).__name__ == "SignVote"
    assert "options" not in config["aggregator"]  # SignVote takes none


def test_docs_show_the_example_verbatim() -> None:
    doc = (REPO_ROOT / "docs" / "aggregators.md").read_text()
    source = (REPO_ROOT / "examples" / "custom_aggregator" / "sign_vote.py").read_text()
    block = doc.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert "class SignVote(Aggregator):" in block
    assert block in source
