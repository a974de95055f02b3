"""Label DP for the U-shaped split: joint clipping of the head's per-sample gradients and the cut
rows, noise of the stated std, the accounted figures, the server's checks and ledger, refusals."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedtune.aggregators import create_aggregator
from fedtune.algorithms.base import ClientError, NodeContext, NodeReply
from fedtune.algorithms.registry import create_algorithm
from fedtune.config import RunConfig
from fedtune.data.sampler import BatchSampler
from fedtune.flower.testing import run_local
from fedtune.runtime.loop import check_config
from fedtune.runtime.node import load_node_data
from fedtune.sap.codec import decode_split_reply, decode_split_round, encode_split_reply, encode_split_round
from fedtune.sap.dp import (
    LabelDPHead,
    check_sap_privacy,
    label_dp_figures,
    noise_std,
    uses_per_round,
)
from fedtune.sap.options import SAPOptions
from fedtune.sap.split import ClassifierHead
from fedtune.wire.dp_report import DPFigures

ROOT = Path(__file__).resolve().parents[2]
DP = {
    "privacy.mechanism": "sample",
    "privacy.noise-multiplier": 2.0,
    "privacy.clip": 1.0,
    "algorithm.options.u-shaped": True,
}


def _head_and_data(n: int = 6, hidden: int = 8) -> tuple[ClassifierHead, torch.Tensor, torch.Tensor]:
    head = ClassifierHead(hidden, 3, seed=1)
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(n, hidden, generator=gen) * 3.0
    labels = torch.randint(0, 3, (n,), generator=gen)
    return head, feats, labels


def _figures(sigma_accounted: float, clip: float, steps: int = 1) -> DPFigures:
    return DPFigures(noise_multiplier=sigma_accounted, sample_rate=1.0, steps=steps, clip=clip)


@pytest.mark.parametrize("cut_clip", [0.0, 0.05])
def test_joint_norms_are_each_examples_head_gradient_and_cut_row(cut_clip: float) -> None:
    """opacus' per-sample head gradients plus the (weighted) row, against one backward per example."""
    head, feats, labels = _head_and_data()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    private = LabelDPHead(head, opt, _figures(1.0, clip=0.5), batch_size=len(labels), cut_clip=cut_clip)
    weight = 1.0 if cut_clip == 0 else 0.5 / cut_clip
    want = []
    for i in range(len(labels)):
        probe = ClassifierHead(8, 3, seed=1)
        x = feats[i : i + 1].clone().requires_grad_(True)
        F.cross_entropy(probe(x), labels[i : i + 1]).backward()  # type: ignore[no-untyped-call]
        grads = [p.grad.flatten() for p in probe.parameters() if p.grad is not None]
        assert x.grad is not None
        want.append(float(torch.cat([*grads, weight * x.grad.flatten()]).norm()))
    try:
        private.step(feats, labels)
    finally:
        private.close()
    np.testing.assert_allclose(private.last_norms.numpy(), want, rtol=1e-5)
    assert max(want) > 0.5  # so the clip binds: every example's joint vector was scaled to <= C
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in head.parameters())


def test_a_private_step_changes_the_head_and_removes_its_hooks() -> None:
    head, feats, labels = _head_and_data()
    before = {k: v.copy() for k, v in head.arrays().items()}
    private = LabelDPHead(
        head, torch.optim.AdamW(head.parameters(), lr=1e-2), _figures(1.0, 1.0), batch_size=len(labels)
    )
    loss, rows = private.step(feats, labels)
    private.close()
    assert math.isfinite(loss) and rows.shape == feats.shape
    after = head.arrays()
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    assert not head._forward_hooks and not head.linear._forward_hooks  # opacus' hooks are gone


def test_the_rows_sent_up_carry_noise_of_the_stated_std() -> None:
    """With sigma C_cut far above any clipped row, the rows times B are the noise: std
    2 sigma_acc C_cut (the head's sum gets 2 sigma_acc C)."""
    n, hidden = 256, 64
    head = ClassifierHead(hidden, 2, seed=0)
    feats = torch.zeros(n, hidden)
    labels = torch.zeros(n, dtype=torch.long)
    figures = _figures(25.0, clip=2.0)  # accounted sigma 25: std 100 on the head, 50 on rows
    private = LabelDPHead(
        head, torch.optim.SGD(head.parameters(), lr=0.0), figures, batch_size=n, cut_clip=1.0
    )
    try:
        _, rows = private.step(feats, labels)
    finally:
        private.close()
    sent = (rows * n).numpy().ravel()
    assert noise_std(figures) == 100.0
    assert abs(float(sent.std()) / 50.0 - 1.0) < 0.03
    assert abs(float(sent.mean())) < 50.0 * 4 / math.sqrt(sent.size)


@pytest.mark.parametrize(
    ("steps", "batch", "n", "want"), [(3, 4, 40, 1), (10, 4, 40, 1), (11, 4, 40, 2), (5, 16, 6, 5)]
)
def test_uses_per_round(steps: int, batch: int, n: int, want: int) -> None:
    assert uses_per_round(steps, batch, n) == want


@pytest.mark.parametrize(("n", "batch", "steps"), [(7, 3, 10), (40, 16, 15), (5, 8, 4), (13, 13, 3)])
def test_shuffled_batches_never_use_an_example_more_than_accounted(n: int, batch: int, steps: int) -> None:
    for key in range(20):
        sampler = BatchSampler(num_examples=n, batch_size=min(batch, n), key=(key, 1, 2))
        counts = np.bincount([i for _ in range(steps) for i in sampler.next_indices()], minlength=n)
        assert counts.max() <= uses_per_round(steps, batch, n)


def test_figures_follow_the_config(sap_cfg: Any) -> None:
    cfg = sap_cfg(**DP)
    opts = create_algorithm(cfg).options
    f = label_dp_figures(cfg, opts, num_examples=40)
    assert f == DPFigures(noise_multiplier=1.0, sample_rate=1.0, steps=1, clip=1.0)
    target = sap_cfg(**{**DP, "privacy.noise-multiplier": 0.0, "privacy.target-epsilon": 4.0})
    derived = label_dp_figures(target, opts, num_examples=40)
    assert derived is not None and derived.noise_multiplier > 0
    assert label_dp_figures(sap_cfg(), opts, num_examples=40) is None


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            {"privacy.mechanism": "client", "aggregator.options.weighting": "equal"},
            "cut gradients every step",
        ),
        ({"algorithm.options.u-shaped": False}, "sends them in the clear"),
        ({"algorithm.options.cti": True}, "cti = false"),
        ({"data.sampling": "class-balanced"}, "data.sampling = 'shuffle'"),
    ],
    ids=["client-level", "standard-split", "cti", "balanced"],
)
def test_configs_sap_cannot_honour_are_refused(sap_cfg: Any, extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_algorithm(sap_cfg(**{**DP, **extra}))


def test_a_negative_cut_clip_is_a_config_error(sap_cfg: Any) -> None:
    with pytest.raises(ValueError, match="dp-cut-clip must be a finite bound >= 0"):
        create_algorithm(sap_cfg(**{**DP, "algorithm.options.dp-cut-clip": -1.0}))


def test_the_causal_lm_split_is_refused(causal_sap_cfg: Any) -> None:
    with pytest.raises(ValueError, match="task = 'classification'"):
        check_sap_privacy(causal_sap_cfg(**DP), SAPOptions(task="causal-lm", u_shaped=True))


def _node(cfg: Any, i: int, tmp_path: Path) -> NodeContext:
    return NodeContext(i, i, load_node_data(cfg, {"partition-id": i}), tmp_path / f"state-{i}")


def test_the_server_checks_and_accounts_each_replys_figures(sap_cfg: Any, tmp_path: Path) -> None:
    cfg = sap_cfg(**{**DP, "federation.clients-per-round": 2})
    algo = create_algorithm(cfg)
    server = algo.server(create_aggregator(cfg.aggregator.name, {}))
    try:
        payloads = server.configure(1, [0, 1])
        honest = decode_split_reply(algo.client().train(payloads[0], _node(cfg, 0, tmp_path)))
        assert honest.dp == label_dp_figures(cfg, algo.options, num_examples=honest.num_examples)
        shaded = dataclasses.replace(
            decode_split_reply(algo.client().train(payloads[1], _node(cfg, 1, tmp_path))),
            dp=_figures(50.0, 1.0),  # claims far more noise than the config asks for
        )
        outcome = server.aggregate(
            1,
            [
                NodeReply(0, payload=encode_split_reply(honest)),
                NodeReply(1, payload=encode_split_reply(shaded)),
            ],
            min_replies=1,
        )
        assert outcome.applied
        assert [r.node_id for r in outcome.rejected] == [1]
        assert "noise multiplier" in outcome.rejected[0].reason
        assert 0 < float(outcome.metrics["epsilon"]) < math.inf
        state = server.state_dict()
        assert any(k.startswith("dp.") for k in state)
    finally:
        server.close()
    plain = create_algorithm(sap_cfg(**{"algorithm.options.u-shaped": True}))
    public_state = plain.server(create_aggregator(cfg.aggregator.name, {})).state_dict()
    fresh = algo.server(create_aggregator(cfg.aggregator.name, {}))
    with pytest.raises(ValueError, match="no privacy ledger"):  # refused whole, before any change
        fresh.load_state_dict(public_state)


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(str(summary["run_dir"])) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_label_dp_config_runs_reports_growing_epsilon_and_resumes_exactly(
    sap_cfg: Any, tmp_path: Path
) -> None:
    """simulations/sap_label_dp.toml passes the run's checks; its privacy and split settings, on
    the tiny run, train two rounds, and a resumed run reports the same epsilons."""
    shipped = RunConfig.load(ROOT / "simulations" / "sap_label_dp.toml")
    check_config(shipped)
    sizes = {"local-steps", "batch-size", "lr"}
    keep = {
        k: v
        for k, v in shipped.to_flat().items()
        if k.startswith("privacy.")
        or (k.startswith("algorithm.options.") and k.rsplit(".", 1)[1] not in sizes)
        or k in ("data.partition", "data.sampling")
    }
    cfg = sap_cfg(**keep)
    assert cfg.privacy == shipped.privacy and cfg.privacy.target_epsilon == 8.0
    full, _ = run_local(cfg, run_dir=tmp_path / "full")
    rows = _rows(full)[1:]
    assert [r["applied"] for r in rows] == [True, True]
    eps = [r["epsilon"] for r in rows]
    assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6  # sigma was derived for the run's worst case
    run_local(cfg, run_dir=tmp_path / "stopped", stop_after=1)
    resumed, _ = run_local(cfg, run_dir=tmp_path / "stopped", resume=True)
    assert [r["epsilon"] for r in _rows(resumed)[1:]] == eps


def test_a_client_refuses_a_round_larger_than_its_privacy_accounts_for(sap_cfg: Any, tmp_path: Path) -> None:
    cfg = sap_cfg(**DP)
    algo = create_algorithm(cfg)
    server = algo.server(create_aggregator(cfg.aggregator.name, {}))
    try:
        sent = decode_split_round(server.configure(1, [0])[0])
        greedy = encode_split_round(dataclasses.replace(sent, steps=sent.steps * 10))
        with pytest.raises(ClientError, match="accounted for 3 of 4"):
            algo.client().train(greedy, _node(cfg, 0, tmp_path))
    finally:
        server.close()


def test_dp_figures_in_a_run_without_privacy_are_rejected(sap_cfg: Any, tmp_path: Path) -> None:
    cfg = sap_cfg(**{"algorithm.options.u-shaped": True, "federation.clients-per-round": 1})
    algo = create_algorithm(cfg)
    server = algo.server(create_aggregator(cfg.aggregator.name, {}))
    try:
        payload = server.configure(1, [0])[0]
        reply = decode_split_reply(algo.client().train(payload, _node(cfg, 0, tmp_path)))
        forged = encode_split_reply(dataclasses.replace(reply, dp=_figures(1.0, 1.0)))
        outcome = server.aggregate(1, [NodeReply(0, payload=forged)], min_replies=1)
        assert not outcome.applied and "privacy off" in outcome.rejected[0].reason
    finally:
        server.close()
