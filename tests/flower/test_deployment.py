"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, SuperNodes with
their own data files, ``flwr run``, the SuperLink's final status, and a node killed mid-round."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtune.config import RunConfig
from fedtune.fedkseed.replica import build_replica
from fedtune.fedkseed.state import WEIGHTS_FILE, load_weights
from fedtune.flower.deploy import LoopbackDeployment, node_config_arg
from fedtune.flower.loopback import KillPlan, run_loopback

pytestmark = [pytest.mark.slow, pytest.mark.third_party_rng]


def test_node_config_arg_quotes_strings_and_refuses_bad_keys() -> None:
    text = node_config_arg({"partition-id": 0, "data-path": "/d/n 0.jsonl"})
    assert text == 'partition-id=0 data-path="/d/n 0.jsonl"'
    with pytest.raises(ValueError, match="kebab-case"):
        node_config_arg({"data_path": "x"})


def test_unregistered_or_untrusting_nodes_are_refused(tmp_path: Path) -> None:
    with LoopbackDeployment(tmp_path) as dep:
        good = dep.new_key("good")
        good_id = dep.register(good)
        unregistered = dep.start_supernode({"partition-id": 1}, key=dep.new_key("unregistered"))
        no_ca_key = dep.new_key("no-ca")
        dep.register(no_ca_key)
        no_ca = dep.start_supernode({"partition-id": 2}, key=no_ca_key, with_ca=False)
        dep.start_supernode({"partition-id": 0}, key=good)  # the control: the same SuperLink admits it
        assert unregistered.wait_exit(90) not in (None, 0)
        assert no_ca.wait_exit(90) not in (None, 0)
        assert "2004" in unregistered.log.read_text()  # "Failed to activate SuperNode"
        assert "CERTIFICATE_VERIFY_FAILED" in no_ca.log.read_text()
        deadline = time.monotonic() + 60
        while good_id not in dep.online_nodes() and time.monotonic() < deadline:
            time.sleep(1.0)
        assert dep.online_nodes() == [good_id]


def _rounds_by_number(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(r["round"]): r for r in rows}


def test_tls_deployment_survives_a_node_killed_mid_round(
    tmp_path: Path, tiny_run_flat: dict[str, Any]
) -> None:
    overrides = {
        **tiny_run_flat,
        "run.output-dir": str(tmp_path / "runs"),
        "federation.num-clients": 2,
        "federation.clients-per-round": 2,
        "federation.num-rounds": 4,
        "federation.min-replies": 1,
        # Above a round's normal length under load (a ClientApp process per message, 3 s polls);
        # the killed node's round ends earlier, when the SuperLink marks it unavailable.
        "federation.round-timeout-s": 60.0,
        "federation.node-wait-s": 90.0,
    }
    report = run_loopback(tmp_path / "deploy", overrides, num_nodes=2, kill=KillPlan(1, 2), timeout_s=600)
    assert report.run.ok, (report.run.status, report.run.output_tail[-3000:], report.events)
    assert report.run.status == "finished:completed"
    assert [e.split(" at ")[0] for e in report.events] == ["killed node 1 in round 2", "restarted node 1"]
    server = _rounds_by_number(report.server_rounds)
    assert sorted(server) == [0, 1, 2, 3, 4] and all(server[r]["applied"] for r in (1, 2, 3, 4))
    assert server[1]["accepted"] == 2
    assert server[2]["accepted"] == 1 and server[2]["rejected"] == 1  # the round went on without node 1

    node0, node1 = (_rounds_by_number(report.node_rounds[i]) for i in (0, 1))
    assert sorted(node0) == [1, 2, 3, 4] and 2 not in node1  # node 1 never finished round 2
    assert all(r["outcome"] == "ok" for r in (*node0.values(), *node1.values()))
    # Every round after the first runs in a fresh process that starts from the node's verified weights.
    assert [node0[r]["state_restored"] for r in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert len({node0[r]["pid"] for r in (1, 2, 3, 4)}) == 4
    # Back after the kill, node 1 synced from its saved round-1 weights and the server counted it.
    back = [r for r in sorted(node1) if r > 2]
    assert back, report.events
    assert node1[back[0]]["state_restored"] == 1 and server[back[0]]["accepted"] == 2

    # What node 1 holds is exactly theta_0 + replay(C) for the C it saved.
    cfg = RunConfig.from_flat(overrides)
    replica = build_replica(cfg)
    state = next((tmp_path / "deploy/node-1/state").glob(f"*/client-1/{WEIGHTS_FILE}"))
    saved = load_weights(
        state, replica.client.stepper.tuned, fingerprint=replica.fingerprint, num_seeds=cfg.fedkseed.num_seeds
    )
    assert saved is not None and saved.server_round == back[-1]
    replica.client.sync_to(saved.coefficients)
    want = torch.cat([t.reshape(-1) for t in replica.client.stepper.tuned.tensors])
    got = torch.cat([t.reshape(-1) for t in saved.tensors])
    assert float((got - want).norm() / want.norm()) < 1e-6
    assert np.count_nonzero(saved.coefficients) > 0
