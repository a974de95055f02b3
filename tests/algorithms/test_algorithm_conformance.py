"""Every registered algorithm passes the conformance checks; the registry behaves like the aggregators'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedtune.algorithms import Algorithm, available_algorithms, register_algorithm, resolve_algorithm
from fedtune.algorithms.registry import ALGORITHMS, create_algorithm
from fedtune.runtime.conformance import (
    check_one_round_applies,
    check_rejections_leave_state_untouched,
    check_state_round_trip,
)

CHECKS = [check_one_round_applies, check_rejections_leave_state_untouched, check_state_round_trip]


# Split-and-privatize on the tiny Llama: causal LM, no noise (so two runs are comparable).
SAP_TINY = {
    "algorithm.options.task": "causal-lm",
    "algorithm.options.privatize": False,
    "algorithm.options.local-steps": 2,
    "algorithm.options.batch-size": 2,
}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("algorithm", ["fedkseed", "fedkseed-pro", "lora-fedavg", "sap"])
def test_builtin_algorithms_conform(run_cfg: Any, tmp_path: Path, algorithm: str, check: Any) -> None:
    extra = SAP_TINY if algorithm == "sap" else {}
    check(run_cfg(**{"run.algorithm": algorithm, **extra}), tmp_path)


def test_builtins_are_listed_and_resolve_lazily() -> None:
    assert {"fedkseed", "fedkseed-pro", "lora-fedavg", "sap"} <= set(available_algorithms())
    assert resolve_algorithm("lora-fedavg").__name__ == "LoRAFedAvg"


def test_unknown_names_and_duplicates_raise(run_cfg: Any) -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'fedsgd'"):
        resolve_algorithm("fedsgd")
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_algorithm("no_such_pkg.mod:Algo")
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("fedkseed")(type("Other", (Algorithm,), {"server": None, "client": None}))


def test_an_outside_algorithm_gets_its_options_checked(run_cfg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tuned(Algorithm):
        def __init__(self, cfg: Any, *, rounds_per_sync: int = 1) -> None:
            super().__init__(cfg)
            self.rounds_per_sync = rounds_per_sync

        def server(self, aggregator: Any) -> Any:
            raise NotImplementedError

        def client(self) -> Any:
            raise NotImplementedError

    monkeypatch.setattr(ALGORITHMS, "_registered", {**ALGORITHMS._registered})
    register_algorithm("tuned-test")(Tuned)
    built = create_algorithm(
        run_cfg(**{"run.algorithm": "tuned-test", "algorithm.options.rounds-per-sync": 3})
    )
    assert isinstance(built, Tuned) and built.rounds_per_sync == 3
    with pytest.raises(ValueError, match=r"takes no option 'bogus'.*rounds-per-sync"):
        create_algorithm(run_cfg(**{"run.algorithm": "tuned-test", "algorithm.options.bogus": 1}))
    with pytest.raises(ValueError, match="rounds-per-sync"):
        create_algorithm(run_cfg(**{"run.algorithm": "tuned-test", "algorithm.options.rounds-per-sync": "x"}))
