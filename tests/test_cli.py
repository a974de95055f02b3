"""The ``fedtune`` command line: parsing, config + ``--set`` overlay, clear errors, zo-check on a tiny model.

``simulate`` and ``export`` are stubbed where a real run would be slow; their error paths run for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fedtune.export
import fedtune.flower.sim
from fedtune.assets.models import count_parameters, load_causal_lm
from fedtune.cli import main
from fedtune.config import RunConfig
from fedtune.config import parse_override as _parse_value
from fedtune.zo import ParamSelection, zo_check_report


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    """Replaces the Ray simulation; collects the configs ``fedtune simulate`` would run."""
    calls: list[RunConfig] = []

    def fake_simulate(
        cfg: RunConfig, *, resume_dir: Path | None = None, ray_address: str | None = None
    ) -> dict[str, Any]:
        calls.append(cfg)
        return {"completed_rounds": cfg.federation.num_rounds, "final_heldout_loss": 1.5}

    monkeypatch.setattr(fedtune.flower.sim, "simulate", fake_simulate)
    return calls


def _zo_check(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["zo-check", *argv]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


# -- parsing ---------------------------------------------------------------------------------------
def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("simulate", "assets", "zo-check", "export"):
        assert command in out


@pytest.mark.parametrize(
    ("command", "needle"),
    [("simulate", "--set"), ("assets", "usage"), ("zo-check", "--seed-index"), ("export", "run_dir")],
)
def test_each_subcommand_has_help(command: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and needle in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [[], ["train"], ["zo-check", "--seed-index", "x"], ["export", "only-one-dir"]],
    ids=["no-command", "unknown-command", "non-int-seed-index", "missing-out-dir"],
)
def test_argparse_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: fedtune" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-6", 1e-6),
        ("3", 3),
        ("2.5", 2.5),
        ("true", True),
        ("'single'", "single"),
        ('"a b"', "a b"),
        ("fedkseed-pro", "fedkseed-pro"),  # not TOML: kept as the bare string
        ("my run", "my run"),
    ],
)
def test_set_values_are_toml_scalars_or_bare_strings(text: str, value: object) -> None:
    parsed = _parse_value(text)
    assert parsed == value and type(parsed) is type(value)


# -- simulate: config overlay and errors ------------------------------------------------------------
def test_simulate_overlays_set_on_the_config_file(
    simulated: list[RunConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[zo]\nlr = 1e-5\n[federation]\nnum-rounds = 3\n[run]\nname = "from-file"\n')
    rc = main(["simulate", str(path), "--set", " zo.lr = 2e-6 ", "--set", "run.name='x y'"])
    assert rc == 0
    (cfg,) = simulated
    assert cfg.zo.lr == 2e-6 and cfg.run.name == "x y"  # --set wins over the file
    assert cfg.federation.num_rounds == 3  # file wins over defaults
    assert cfg.zo.eps == RunConfig().zo.eps  # the rest are defaults
    assert json.loads(capsys.readouterr().out) == {"completed_rounds": 3, "final_heldout_loss": 1.5}


def test_simulate_resume_continues_a_run_folder_with_its_own_config(
    simulated: list[RunConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = RunConfig.from_flat({"zo.lr": 2e-6})
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    assert main(["simulate", "--resume", str(tmp_path)]) == 2  # no checkpoint yet
    assert "no checkpoint.json" in capsys.readouterr().err
    (tmp_path / "checkpoint.json").write_text("{}")
    assert main(["simulate", "--resume", str(tmp_path)]) == 0
    assert simulated == [cfg]
    assert main(["simulate", "--resume", str(tmp_path), "--set", "zo.lr=1e-6"]) == 2
    assert "drop CONFIG and --set" in capsys.readouterr().err


def test_simulate_without_a_file_uses_defaults(simulated: list[RunConfig]) -> None:
    assert main(["simulate", "--set", "run.algorithm=lora-fedavg"]) == 0
    assert simulated == [RunConfig.from_flat({"run.algorithm": "lora-fedavg"})]


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("zo.lr=fast", "zo.lr must be of type float, got str 'fast'"),
        ("zo.lrr=1e-6", "unknown config key 'zo.lrr'"),
        ("lr=1e-6", "unknown config key 'lr'"),
        ("run.algorithm=fedsgd", "unknown algorithm 'fedsgd'; registered: fedkseed"),
        ("aggregator.options.bogus=1", "takes no option 'bogus'"),
        ("federation.num-rounds=2.5", "federation.num-rounds must be of type int"),
        ("zo.lr=0", "zo.lr must be in (0, 1)"),  # an int is accepted as a float, then range-checked
    ],
)
def test_bad_set_values_exit_2_with_the_reason(
    pair: str, message: str, simulated: list[RunConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--set", pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtune: error: ") and message in err
    assert simulated == []  # nothing ran


def test_set_without_equals_sign_exits_2_with_an_example(
    simulated: list[RunConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--set", "zo.lr"]) == 2
    err = capsys.readouterr().err
    assert "fedtune: error: --set expects key=value (e.g. --set zo.lr=1e-6), got 'zo.lr'" in err
    assert simulated == []


def test_os_errors_exit_2_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # e.g. a local data file deleted after the config was validated: opened only when data is built
    def missing_file(cfg: RunConfig, **_: Any) -> dict[str, Any]:
        raise FileNotFoundError(2, "No such file or directory", "/data/reviews.jsonl")

    monkeypatch.setattr(fedtune.flower.sim, "simulate", missing_file)
    assert main(["simulate"]) == 2
    assert (
        "fedtune: error: [Errno 2] No such file or directory: '/data/reviews.jsonl'"
        in capsys.readouterr().err
    )


def test_bad_config_files_exit_2(
    simulated: list[RunConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[zo\nlr = ")
    assert main(["simulate", str(broken)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    typo = tmp_path / "typo.toml"
    typo.write_text("[zo]\nlearning-rate = 1e-6\n")
    assert main(["simulate", str(typo)]) == 2
    assert "unknown config key 'zo.learning-rate'" in capsys.readouterr().err
    assert simulated == []


# -- zo-check ---------------------------------------------------------------------------------------
def test_zo_check_reports_the_tiny_model(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _zo_check(capsys, "--model", str(tiny_model_dir), "--seed-index", "3")
    model = load_causal_lm(str(tiny_model_dir))
    assert report["num_elements"] == count_parameters(model)  # tune = all, tied embedding once
    assert (report["kind"], report["run_seed"], report["seed_index"]) == ("rademacher", 42, 3)
    assert report == zo_check_report(
        model, ParamSelection(mode="all"), run_seed=42, kind="rademacher", seed_index=3
    )
    # deterministic: a second machine (here: a second call) prints the same report
    assert _zo_check(capsys, "--model", str(tiny_model_dir), "--seed-index", "3") == report


def test_zo_check_follows_config_and_overrides(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_model_dir)
    base = _zo_check(capsys, "--model", model)
    # The config file's model is replaced by --model; its run seed and zo keys are used.
    path = tmp_path / "c.toml"
    path.write_text('[model]\nname = "not-a-model"\n[run]\nseed = 7\n[zo]\ntune = "no-embeddings"\n')
    other = _zo_check(capsys, "--config", str(path), "--model", model)
    assert other["run_seed"] == 7 and other["z_checksum"] != base["z_checksum"]
    embed = load_causal_lm(model).get_input_embeddings()  # tied with lm_head: one tensor
    assert base["num_elements"] - other["num_elements"] == count_parameters(embed)
    gaussian = _zo_check(capsys, "--model", model, "--set", "zo.perturbation='gaussian'")
    assert gaussian["kind"] == "gaussian" and gaussian["z_checksum"] != base["z_checksum"]
    assert gaussian["num_elements"] == base["num_elements"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "/no/such/model"], "Unknown model '/no/such/model'"),
        (["--set", "zo.tune='everything'"], "zo.tune = 'everything' is not one of"),
    ],
)
def test_zo_check_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zo-check", *argv]) == 2
    assert message in capsys.readouterr().err


def test_zo_check_rejects_more_layers_than_the_model_has(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["zo-check", "--model", str(tiny_model_dir), "--set", "model.num-layers=5"]) == 2
    assert "num_layers must be an int in [1, 2]" in capsys.readouterr().err


# -- export -----------------------------------------------------------------------------------------
def test_export_passes_paths_and_reports_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[Path, Path]] = []

    def fake_export(run_dir: Path, out_dir: Path) -> Path:
        seen.append((run_dir, out_dir))
        return out_dir

    monkeypatch.setattr(fedtune.export, "export_run", fake_export)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert seen == [(tmp_path / "run", tmp_path / "out")]
    assert f"wrote a Hugging Face checkpoint to {tmp_path / 'out'}" in capsys.readouterr().out


def test_export_of_a_run_without_checkpoint_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.toml").write_text(RunConfig.from_flat({"run.algorithm": "lora-fedavg"}).to_toml())
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no checkpoint.json" in capsys.readouterr().err


def test_export_of_a_folder_that_is_no_run_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not a fedtune run folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
