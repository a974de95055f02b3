"""RunConfig: validation, flat keys, TOML round trip, and agreement with the serialized defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedtune.config import RunConfig, flatten

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = RunConfig()
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert RunConfig.load(path) == cfg


def test_pyproject_app_config_equals_dataclass_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flat = flatten(pyproject["tool"]["flwr"]["app"]["config"])
    assert flat == RunConfig().to_flat()


def test_default_simulation_file_equals_defaults() -> None:
    assert RunConfig.load(ROOT / "simulations" / "default.toml") == RunConfig()


@pytest.mark.parametrize("path", sorted((ROOT / "simulations").glob("*.toml")), ids=lambda p: p.name)
def test_every_simulation_config_loads(path: Path) -> None:
    RunConfig.load(path)


@pytest.mark.parametrize(
    ("name", "algorithm"), [("lora_fedavg.toml", "lora-fedavg"), ("fedkseed_pro.toml", "fedkseed-pro")]
)
def test_baseline_configs_share_the_main_jobs_setup(name: str, algorithm: str) -> None:
    # A comparison is only fair if model, data, partitions, rounds and step budget are the main job's.
    cfg, default = RunConfig.load(ROOT / "simulations" / name), RunConfig()
    assert cfg.run.algorithm == algorithm
    shared = (cfg.model, cfg.data, cfg.federation, cfg.zo)
    assert shared == (default.model, default.data, default.federation, default.zo)
    if algorithm == "lora-fedavg":
        assert (cfg.lora.local_steps, cfg.lora.batch_size) == (default.zo.local_steps, default.zo.batch_size)


def test_flat_overrides_like_flower_run_config() -> None:
    cfg = RunConfig.from_flat({"zo.lr": 1e-6, "federation.num-rounds": 3, "run.algorithm": "fedkseed-pro"})
    assert cfg.zo.lr == 1e-6 and cfg.federation.num_rounds == 3 and cfg.run.algorithm == "fedkseed-pro"
    assert isinstance(RunConfig.from_flat({"aggregator.clip-norm": 2}).aggregator.clip_norm, float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"zo.lrr": 1e-6}, "unknown config key 'zo.lrr'"),
        ({"zoo.lr": 1e-6}, "unknown config key 'zoo.lr'"),
        ({"zo.local_steps": 3}, "unknown config key 'zo.local_steps'"),
        ({"zo.lr": "fast"}, "zo.lr must be of type float"),
        ({"federation.num-rounds": 2.5}, "must be of type int"),
        ({"fedkseed.sparse-sync": 1}, "must be of type bool"),
        ({"run.algorithm": "fedsgd"}, "run.algorithm = 'fedsgd' is not one of"),
        (
            {"federation.clients-per-round": 11},
            "clients_per_round must be between 1 and federation.num_clients",
        ),
        ({"zo.lr": 0.0}, "zo.lr must be in (0, 1)"),
        ({"data.alpha": -1.0}, "data.alpha must be > 0"),
        ({"aggregator.trim-fraction": 0.5}, "trim_fraction must be in [0, 0.5)"),
    ],
)
def test_bad_values_raise_with_the_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        RunConfig.from_flat(overrides)


def test_missing_and_invalid_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[zo\nlr = ")
    with pytest.raises(ValueError, match="not valid TOML"):
        RunConfig.load(bad)


def test_cosine_schedule_hits_both_ends() -> None:
    cfg = RunConfig.from_flat({"zo.lr-schedule": "cosine", "zo.lr": 1e-5, "zo.lr-min": 1e-6})
    assert cfg.zo.lr_at(1, 10) == pytest.approx(1e-5)
    assert cfg.zo.lr_at(10, 10) == pytest.approx(1e-6)
    assert cfg.zo.lr_at(5, 10) < 1e-5
