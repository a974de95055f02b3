"""The Flower-native path, ``flwr run .``, for real: a tiny run completes, a broken one is reported failed.

``flwr run --stream`` exits 0 even when the run failed, so :func:`flwr_run` reads the status the
SuperLink recorded (``flwr list local --run-id <id> --format json``). Each launch gets its own
FLWR_HOME and ports and stops the SuperLink it started; the slow tests check that none is left.
"""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from flwr.common.config import flatten_dict, parse_config_args, validate_fields_in_config

from fedtune.config import RunConfig
from fedtune.flower.launch import _check_known_keys, _dotted_toml, _federation_config, flwr_run

ROOT = Path(__file__).resolve().parents[2]
NODES = 2


def superlinks_for(home: Path) -> list[int]:
    """``flower-superlink`` processes whose state lives under ``home`` (pgrep -f, then our path)."""
    done = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True, check=False)
    pids = [int(p) for p in done.stdout.split()]
    mine = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(home) in cmdline:
            mine.append(pid)
    return mine


# -- fast: what Flower's CLI will read ----------------------------------------------------------------
def test_pyproject_is_a_valid_flower_app_with_the_defaults_as_run_config() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ok, errors, _ = validate_fields_in_config(config)
    assert ok, errors
    # Flower flattens the table itself (empty [*.options] tables add no key)
    assert flatten_dict(config["tool"]["flwr"]["app"]["config"]) == RunConfig().to_flat()


def test_flower_reads_default_toml_as_the_defaults() -> None:
    # `--run-config simulations/default.toml`: Flower flattens the tables into our dotted keys
    assert parse_config_args([str(ROOT / "simulations" / "default.toml")]) == RunConfig().to_flat()


def test_merged_run_config_file_reads_back_through_flower(tmp_path: Path) -> None:
    flat = {"zo.lr": 1e-06, "run.name": 'a "b"', "fedkseed.sparse-sync": True, "federation.num-rounds": 2}
    path = tmp_path / "rc.toml"
    path.write_text(_dotted_toml(flat))
    back = parse_config_args([str(path)])
    assert back == flat and [type(v) for v in back.values()] == [type(v) for v in flat.values()]


def test_federation_config_follows_the_federation_section() -> None:
    text = _federation_config(ROOT, {"federation.client-cpus": 1, "federation.client-gpus": 0.5}, 7)
    parsed = parse_config_args([text])
    assert parsed["num-supernodes"] == 7
    assert parsed["client-resources-num-cpus"] == 1 and parsed["client-resources-num-gpus"] == 0.5
    assert parsed["init-args-num-cpus"] >= 1


def test_keys_flower_would_refuse_are_named_before_starting() -> None:
    # Flower answers only "[code: 15] Invalid run configuration" for a key pyproject lacks.
    with pytest.raises(ValueError, match=r"not there: aggregator\.options\.num-byzantine, zo\.lrr\."):
        _check_known_keys(ROOT, {"zo.lrr": 1.0, "aggregator.options.num-byzantine": 1, "zo.lr": 1e-6})
    _check_known_keys(ROOT, RunConfig().to_flat())


# -- slow: the real `flwr run .` ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.third_party_rng
def test_flwr_run_completes_a_tiny_run(tiny_run_flat: dict[str, Any], tmp_path: Path) -> None:
    # Prepare: a run-config file with tables per section (like simulations/*.toml) + overrides.
    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    run_config = tmp_path / "tiny.toml"
    run_config.write_text(
        f"[federation]\nnum-clients = {NODES}\nclients-per-round = {NODES}\nnum-rounds = 2\n"
        'node-wait-s = 60.0\n\n[run]\nname = "flwr-tiny"\n'
    )
    # Execute
    t0 = time.monotonic()
    result = flwr_run(
        ROOT,
        run_config=run_config,
        overrides={
            **{k: v for k, v in tiny_run_flat.items() if not k.startswith("federation.")},  # the file's
            "zo.local-steps": 2,
            "run.output-dir": str(out),
        },
        num_supernodes=NODES,
        flwr_home=home,
        timeout_s=240,
    )
    wall = time.monotonic() - t0
    # Assert: completed as the SuperLink recorded it, and the run folder has both rounds
    assert result.ok, f"status {result.status}\n{result.output_tail}"
    assert result.status == "finished:completed" and result.run_id is not None
    assert result.returncode == 0
    metrics = list(out.glob("flwr-tiny/*/metrics.jsonl"))
    assert len(metrics) == 1, result.output_tail
    rows = [json.loads(line) for line in metrics[0].read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["accepted"] == NODES for r in rows[1:])
    assert RunConfig.load(metrics[0].parent / "config.toml").federation.num_clients == NODES
    assert superlinks_for(home) == [], "flwr_run left its local SuperLink running"
    print(f"flwr run (tiny, {NODES} SuperNodes, 2 rounds): {wall:.1f} s")


@pytest.mark.slow
@pytest.mark.third_party_rng
def test_a_failed_run_is_reported_failed_though_flwr_exits_0(
    tiny_run_flat: dict[str, Any], tmp_path: Path
) -> None:
    home = tmp_path / "flwr-home"
    overrides = {
        **tiny_run_flat,
        "run.algorithm": "no.such.module:X",
        "federation.num-clients": NODES,
        "federation.clients-per-round": NODES,
        "federation.num-rounds": 1,
    }
    result = flwr_run(
        ROOT, run_config=None, overrides=overrides, num_supernodes=NODES, flwr_home=home, timeout_s=180
    )
    assert result.returncode == 0  # what `flwr run --stream` says ...
    assert not result.ok and "failed" in result.status  # ... and what really happened
    assert result.run_id is not None
    assert "no.such.module" in str(result.run_info.get("status-details", "")) + result.output_tail
    assert superlinks_for(home) == [], "flwr_run left its local SuperLink running"
