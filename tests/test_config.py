"""RunConfig: validation, flat keys, TOML round trip, and agreement with the serialized defaults."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedtune.algorithms.registry import create_algorithm
from fedtune.config import AggregatorSection, AlgorithmSection, RunConfig, flatten

ROOT = Path(__file__).resolve().parents[1]


def typed(flat: dict[str, object]) -> dict[str, tuple[str, object]]:
    # 1 == 1.0 == True in Python; Flower keeps int, float and bool apart, so compare the types too.
    return {k: (type(v).__name__, v) for k, v in flat.items()}


def strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).strip()


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = RunConfig()
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert RunConfig.load(path) == cfg


def test_pyproject_app_config_equals_dataclass_defaults() -> None:
    # Flower's run config under `flwr run` is exactly this table (plus --run-config), and Flower
    # refuses override keys the table lacks: it must hold every default key, with its type.
    text = (ROOT / "pyproject.toml").read_text()
    flat = flatten(tomllib.loads(text)["tool"]["flwr"]["app"]["config"])
    assert typed(flat) == typed(RunConfig().to_flat())
    # ... and be written the way RunConfig().to_toml() writes it (same tables, order and spelling).
    start = text.index("[tool.flwr.app.config.")
    block = text[start : text.index("[tool.pytest.ini_options]")]
    expected = RunConfig().to_toml().replace("\n[", "\n[tool.flwr.app.config.")
    expected = "[tool.flwr.app.config." + expected.removeprefix("[")
    assert block.strip() == expected.strip()


def test_default_simulation_file_equals_defaults() -> None:
    text = (ROOT / "simulations" / "default.toml").read_text()
    assert RunConfig.load(ROOT / "simulations" / "default.toml") == RunConfig()
    # every key, not just "loads to the defaults" (a missing key would silently fall back)
    assert typed(flatten(tomllib.loads(text))) == typed(RunConfig().to_flat())
    assert strip_comments(text) == RunConfig().to_toml().strip()


def test_default_simulation_file_names_a_working_flwr_command() -> None:
    # `flwr run` simulates 2 SuperNodes unless told; the main job needs one per client.
    text = (ROOT / "simulations" / "default.toml").read_text()
    num_clients = RunConfig().federation.num_clients
    assert f'--federation-config "num-supernodes={num_clients}"' in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text


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
    assert isinstance(
        RunConfig.from_flat({"aggregator.max-weight-ratio": 2}).aggregator.max_weight_ratio, float
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"zo.lrr": 1e-6}, "unknown config key 'zo.lrr'"),
        ({"zoo.lr": 1e-6}, "unknown config key 'zoo.lr'"),
        ({"zo.local_steps": 3}, "unknown config key 'zo.local_steps'"),
        ({"zo.lr": "fast"}, "zo.lr must be of type float"),
        ({"federation.num-rounds": 2.5}, "must be of type int"),
        ({"fedkseed.sparse-sync": 1}, "must be of type bool"),
        ({"run.algorithm": " fedkseed"}, "run.algorithm must name a registered algorithm"),
        (
            {"federation.clients-per-round": 11},
            "clients_per_round must be between 1 and federation.num_clients",
        ),
        ({"zo.lr": 0.0}, "zo.lr must be in (0, 1)"),
        ({"data.alpha": -1.0}, "data.alpha must be > 0"),
        ({"aggregator.max-weight-ratio": 0.5}, "aggregator.max_weight_ratio must be >= 1"),
        ({"aggregator.trim-fraction": 0.1}, "unknown config key 'aggregator.trim-fraction'"),
        ({"zo.lr-schedule": "cosine", "zo.lr-min": 0.0}, "set zo.lr-min > 0"),
        ({"data.sampling": "balanced"}, "data.sampling = 'balanced' is not one of"),
        ({"federation.node-wait-s": -1.0}, "federation.node_wait_s must be >= 0"),
        ({"federation.max-failed-rounds": 0}, "federation.max_failed_rounds must be >= 1"),
        ({"fedkseed.rebuild-each-round": "yes"}, "must be of type bool"),
        (
            {"data.heldout-groups": "history,,science"},
            "data.heldout_groups = 'history,,science' has an empty",
        ),
        ({"data.heldout-groups": "history, history"}, "names a group twice"),
        ({"data.zeroshot-max-new-tokens": 0}, "data.zeroshot_max_new_tokens must be between 1 and 2048"),
        # options tables hold scalars only: a list, or a nested table (flattened to a dotted key)
        ({"aggregator.options.weights": [1, 2]}, "aggregator.options.weights must be a bool, int, float"),
        ({"algorithm.options.sub.x": 1}, "algorithm.options key 'sub.x' must be kebab-case"),
        ({"aggregator.options": {"num-byzantine": 1}}, "aggregator.options is a table"),
        ({"algorithm.options.max_iter": 1}, "algorithm.options key 'max_iter' must be kebab-case"),
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


def test_cosine_schedule_with_lr_min_zero_names_the_key() -> None:
    with pytest.raises(ValueError, match=re.escape("zo.lr-min")) as info:
        RunConfig.from_flat({"zo.lr-schedule": "cosine"})  # lr-min defaults to 0
    assert "cosine" in str(info.value)


def test_run_algorithm_is_checked_when_the_run_builds_it() -> None:
    # Any non-blank name is a valid config (outside classes are "package.module:Class"); the
    # registry refuses an unknown one when the run builds the algorithm, listing the known ones.
    cfg = RunConfig.from_flat({"run.algorithm": "fedsgd"})
    with pytest.raises(ValueError, match="unknown algorithm 'fedsgd'; registered: fedkseed"):
        create_algorithm(cfg)
    with pytest.raises(ValueError, match=re.escape("cannot import module 'no.such.module'")):
        create_algorithm(RunConfig.from_flat({"run.algorithm": "no.such.module:X"}))


OPTIONS = {
    "aggregator.name": "krum",
    "aggregator.options.num-byzantine": 1,
    "aggregator.options.select": 2,
    "algorithm.options.temperature": 0.5,
    "algorithm.options.mode": "fast",
    "algorithm.options.warm-start": True,
}


def test_options_tables_round_trip_through_flat_and_toml(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat(OPTIONS)
    assert cfg.aggregator.options == (("num-byzantine", 1), ("select", 2))
    assert cfg.algorithm.options == (("mode", "fast"), ("temperature", 0.5), ("warm-start", True))
    # flat: dotted keys, as Flower's run config holds them
    flat = cfg.to_flat()
    assert typed({k: flat[k] for k in OPTIONS}) == typed(OPTIONS)
    assert RunConfig.from_flat(flat) == cfg
    # TOML: [aggregator.options] / [algorithm.options] tables
    text = cfg.to_toml()
    assert "[aggregator.options]\nnum-byzantine = 1\nselect = 2\n" in text
    assert '[algorithm.options]\nmode = "fast"\ntemperature = 0.5\nwarm-start = true\n' in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert RunConfig.load(path) == cfg
    assert typed(flatten(tomllib.loads(text))) == typed(flat)


def test_options_overlay_keeps_earlier_keys_and_types(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[aggregator]\nname = "krum"\n[aggregator.options]\nnum-byzantine = 1\n')
    cfg = RunConfig.load(path, {"aggregator.options.select": 3, "aggregator.options.num-byzantine": 2})
    assert cfg.aggregator.options == (("num-byzantine", 2), ("select", 3))
    # an int stays an int and a float a float (no coercion: the constructor decides)
    assert RunConfig.from_flat({"aggregator.options.x": 1}).aggregator.options == (("x", 1),)
    assert type(dict(RunConfig.from_flat({"aggregator.options.x": 1.0}).aggregator.options)["x"]) is float


def test_option_values_that_are_tables_or_lists_are_refused(tmp_path: Path) -> None:
    for body, message in [
        ("[aggregator.options]\nweights = [1, 2]\n", "aggregator.options.weights must be a bool"),
        ("[aggregator.options.inner]\nx = 1\n", "aggregator.options key 'inner.x' must be kebab-case"),
        ("[algorithm.options]\ninner = { x = 1 }\n", "algorithm.options key 'inner.x' must be kebab-case"),
    ]:
        path = tmp_path / "bad.toml"
        path.write_text(body)
        with pytest.raises(ValueError, match=message):
            RunConfig.load(path)
    # the sections themselves refuse non-scalar values, however they are built
    with pytest.raises(ValueError, match="must be a bool, int, float or string, got list"):
        AggregatorSection(options=(("weights", [1, 2]),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a bool, int, float or string, got dict"):
        AlgorithmSection(options=(("inner", {"x": 1}),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keys must be unique"):
        AlgorithmSection(options=(("b", 1), ("a", 2)))


def test_heldout_groups_are_a_comma_separated_scalar() -> None:
    assert RunConfig().data.heldout_group_names == ()
    cfg = RunConfig.from_flat({"data.heldout-groups": " history, AI "})
    assert cfg.data.heldout_group_names == ("history", "AI")
    assert cfg.to_flat()["data.heldout-groups"] == " history, AI "  # a scalar: Flower's run config carries it
