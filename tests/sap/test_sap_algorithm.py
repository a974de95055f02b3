"""Split-and-privatize end to end: several clients train one trunk over the gRPC channel, driven
by the real ServerApp loop and ClientApp code on the in-process grid."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedtune.aggregators import create_aggregator
from fedtune.algorithms.base import NodeContext, NodeReply
from fedtune.algorithms.registry import create_algorithm
from fedtune.flower.testing import run_local
from fedtune.runtime.node import load_node_data
from fedtune.sap.channel import ChannelError
from fedtune.sap.codec import decode_split_reply, decode_split_round, encode_split_reply, encode_split_round
from fedtune.wire.tls import write_test_pki


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(str(summary["run_dir"])) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_multi_client_split_rounds_train_the_trunk(sap_cfg: Any) -> None:
    cfg = sap_cfg(**{"algorithm.options.eta": 200.0, "algorithm.options.cti": True})
    summary, _ = run_local(cfg)
    rows = _rows(summary)
    assert summary["completed_rounds"] == 2
    for row in rows[1:]:
        assert row["applied"] is True and row["accepted"] == 3
        assert row["trunk_steps"] == 3 * 3  # every client's steps reached the trunk
        assert row["split_bytes_up_per_step"] > 4 * 384 * 4  # B x S x d fp32 activations went up
        assert row["noise_norm"] > 0 and row["noised_norm"] > 0
    assert 0.0 <= rows[-1]["heldout_accuracy"] <= 1.0
    assert (Path(str(summary["run_dir"])) / "curves.png").is_file()


@pytest.mark.parametrize(
    "options",
    [
        {"algorithm.options.u-shaped": True},
        {"algorithm.options.adapters": "per-client"},
        {"algorithm.options.variant": "text", "algorithm.options.eta": 50.0},
        {"algorithm.options.depth": 1, "algorithm.options.privatize": False},
    ],
    ids=["u-shaped", "per-client", "text", "depth1"],
)
def test_split_variants_complete_their_rounds(sap_cfg: Any, options: dict[str, Any]) -> None:
    summary, _ = run_local(sap_cfg(**{**options, "federation.num-rounds": 1}))
    rows = _rows(summary)
    assert rows[-1]["applied"] is True and rows[-1]["accepted"] == 3
    assert rows[-1]["trunk_steps"] == 9


def test_causal_lm_split_lowers_the_answer_loss(causal_sap_cfg: Any) -> None:
    cfg = causal_sap_cfg(**{"federation.num-rounds": 3, "algorithm.options.privatize": False})
    summary, _ = run_local(cfg)
    assert summary["completed_rounds"] == 3
    assert summary["final_heldout_loss"] < summary["initial_heldout_loss"]


def test_u_shaped_causal_lm_completes(causal_sap_cfg: Any) -> None:
    cfg = causal_sap_cfg(**{"federation.num-rounds": 1, "algorithm.options.u-shaped": True})
    summary, _ = run_local(cfg)
    assert _rows(summary)[-1]["applied"] is True


def test_resume_equals_no_stop(sap_cfg: Any, tmp_path: Path) -> None:
    cfg = sap_cfg(**{"algorithm.options.privatize": False, "algorithm.options.u-shaped": True})
    full, _ = run_local(cfg, run_dir=tmp_path / "full")
    run_local(cfg, run_dir=tmp_path / "stopped", stop_after=1)
    resumed, _ = run_local(cfg, run_dir=tmp_path / "stopped", resume=True)
    keys = ("train_loss", "heldout_loss", "heldout_accuracy")
    assert [[r.get(k) for k in keys] for r in _rows(full)] == [
        [r.get(k) for k in keys] for r in _rows(resumed)
    ]


def test_a_client_error_is_a_rejection_and_the_round_goes_on(sap_cfg: Any) -> None:
    cfg = sap_cfg(**{"federation.num-rounds": 1, "federation.min-replies": 2})

    def node_config(i: int) -> dict[str, Any]:
        if i == 2:  # this node's data file does not exist: its round fails on the client
            return {"partition-id": i, "data-path": "/nonexistent/reviews.jsonl"}
        return {"partition-id": i}

    summary, _ = run_local(cfg, node_config=node_config)
    row = _rows(summary)[-1]
    assert row["applied"] is True and row["accepted"] == 2 and row["rejected"] == 1
    assert row["trunk_steps"] == 6


def _node(cfg: Any, i: int, tmp_path: Path) -> NodeContext:
    return NodeContext(i, i, load_node_data(cfg, {"partition-id": i}), tmp_path / f"state-{i}")


def _trunk_arrays(state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if k.startswith("trunk.") and isinstance(v, np.ndarray)}


def test_a_round_below_min_replies_rolls_the_trunk_back(sap_cfg: Any, tmp_path: Path) -> None:
    cfg = sap_cfg()
    algo = create_algorithm(cfg)
    server = algo.server(create_aggregator(cfg.aggregator.name, {}))
    try:
        payloads = server.configure(1, [0, 1, 2])
        first = NodeReply(0, payload=algo.client().train(payloads[0], _node(cfg, 0, tmp_path)))
        server.aggregate(1, [first, NodeReply(1, payload=b"junk")], min_replies=2)  # skipped: 1 valid reply
        assert not any(np.any(v) for k, v in _trunk_arrays(server.state_dict()).items() if "lora_B" in k)
        payloads = server.configure(2, [0, 1])
        replies = [
            NodeReply(i, payload=algo.client().train(payloads[i], _node(cfg, i, tmp_path))) for i in (0, 1)
        ]
        outcome = server.aggregate(2, replies, min_replies=2)
        assert outcome.applied, outcome.note
        assert any(np.any(v) for k, v in _trunk_arrays(server.state_dict()).items() if "lora_B" in k)
    finally:
        server.close()


def test_a_reply_claiming_steps_the_server_did_not_see_is_rejected(sap_cfg: Any, tmp_path: Path) -> None:
    cfg = sap_cfg()
    algo = create_algorithm(cfg)
    server = algo.server(create_aggregator(cfg.aggregator.name, {}))
    try:
        payloads = server.configure(1, [0, 1])
        real = decode_split_reply(algo.client().train(payloads[0], _node(cfg, 0, tmp_path)))
        forged = encode_split_reply(dataclasses.replace(real, server_round=1))  # node 1 never connected
        outcome = server.aggregate(1, [NodeReply(1, payload=forged)], min_replies=1)
        assert not outcome.applied
        assert "the server ran 0" in outcome.rejected[0].reason
    finally:
        server.close()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("algorithm.options.variant", "text", "needs depth = 0"),
        ("algorithm.options.eta", -1.0, "finite number > 0"),
        ("algorithm.options.adapters", "each", "not one of shared, per-client"),
        ("algorithm.options.tls-cert", "/nope.pem", "go together"),
        ("algorithm.options.splitport", 1, "its options are"),
    ],
)
def test_bad_options_are_config_errors(sap_cfg: Any, key: str, value: Any, match: str) -> None:
    extra = {key: value}
    if key.endswith("variant"):
        extra["algorithm.options.depth"] = 1
    with pytest.raises(ValueError, match=match):
        create_algorithm(sap_cfg(**extra))


def test_split_channel_with_tls(sap_cfg: Any, tmp_path: Path) -> None:
    files = write_test_pki(tmp_path / "pki")
    cfg = sap_cfg(
        **{
            "federation.num-rounds": 1,
            "algorithm.options.tls-cert": str(files.server_cert),
            "algorithm.options.tls-key": str(files.server_key),
            "algorithm.options.tls-ca": str(files.ca_cert),
        }
    )
    summary, _ = run_local(cfg)
    assert _rows(summary)[-1]["accepted"] == 3


def test_a_client_with_a_wrong_token_is_refused_and_rejected(sap_cfg: Any, tmp_path: Path) -> None:
    cfg = sap_cfg()
    algo = create_algorithm(cfg)
    server = algo.server(create_aggregator(cfg.aggregator.name, {}))
    try:
        payloads = server.configure(1, [0, 1])
        stolen = decode_split_round(payloads[1])
        forged = encode_split_round(dataclasses.replace(stolen, token="0" * 64))
        with pytest.raises(ChannelError, match="UNAUTHENTICATED"):
            algo.client().train(forged, _node(cfg, 1, tmp_path))
        # Node 0's token does not open node 1's stream either.
        mixed = encode_split_round(dataclasses.replace(stolen, token=decode_split_round(payloads[0]).token))
        with pytest.raises(ChannelError, match="UNAUTHENTICATED"):
            algo.client().train(mixed, _node(cfg, 1, tmp_path))
        ok = NodeReply(0, payload=algo.client().train(payloads[0], _node(cfg, 0, tmp_path)))
        outcome = server.aggregate(1, [ok], min_replies=1)
        assert outcome.applied and outcome.metrics["trunk_steps"] == 3
        # After the round, the round's own token is revoked too.
        with pytest.raises(ChannelError, match="UNAUTHENTICATED"):
            algo.client().train(payloads[0], _node(cfg, 0, tmp_path))
    finally:
        server.close()


def test_export_writes_a_peft_adapter_and_the_head(sap_cfg: Any, tmp_path: Path) -> None:
    from fedtune.export import export_run

    summary, _ = run_local(sap_cfg(**{"federation.num-rounds": 1}))
    out = export_run(Path(str(summary["run_dir"])), tmp_path / "export")
    info = json.loads((out / "split.json").read_text())
    assert info["classes"] == ["negative", "positive"] and info["adapters"] == ["shared"]
    assert (out / "shared" / "adapter_config.json").is_file()
    assert (out / "shared" / "adapter_model.safetensors").is_file()
    assert (out / "shared" / "head.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.third_party_rng
def test_ray_simulation_trains_over_the_split_channel(sap_cfg: Any) -> None:
    """``fedtune simulate`` on Ray: clients in Ray actors reach the split server in the ServerApp."""
    from fedtune.flower.sim import simulate

    summary = simulate(sap_cfg(**{"federation.clients-per-round": 2, "federation.node-wait-s": 120.0}))
    assert summary["completed_rounds"] == 2
    rows = _rows(summary)
    assert all(r["accepted"] == 2 and r["trunk_steps"] == 6 for r in rows[1:])
