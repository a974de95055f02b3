"""FedKSeed replicas on a chosen device: a CPU replica still works, and (gpu) CPU and CUDA replicas of one
model agree on the fingerprint and, after the same replay, on the weights (a mixed federation)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from fedtune.assets.models import load_causal_lm, load_tokenizer
from fedtune.data.collate import encode_examples
from fedtune.fedkseed.replica import Replica, build_replica, replica_key
from fedtune.zo import ParamSelection, Perturbation, replay, select_parameters

KINDS = ["gaussian", "rademacher"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh(fresh_models: None) -> Iterator[None]:
    yield


def weights(replica: Replica) -> torch.Tensor:
    return torch.cat(
        [t.detach().reshape(-1).to("cpu", copy=True) for t in replica.client.stepper.tuned.tensors]
    )


def accumulator(num_seeds: int, *, seed: int) -> npt.NDArray[np.float64]:
    """A FedKSeed-like accumulator: a few non-zero, lr-folded coefficients."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_seeds]))
    acc = np.zeros(num_seeds)
    picked = rng.choice(num_seeds, size=num_seeds // 4, replace=False)
    acc[picked] = rng.normal(0.0, 1e-3, size=picked.size)
    return acc


def test_cpu_replica_holds_cpu_tensors_and_replays_like_a_direct_replay(run_cfg: Any) -> None:
    # Prepare
    cfg = run_cfg(**{"model.device": "cpu"})
    replica = build_replica(cfg)
    acc = accumulator(cfg.fedkseed.num_seeds, seed=1)
    reference = load_causal_lm(cfg.model.name)
    ref_tuned = select_parameters(reference, ParamSelection(mode=cfg.zo.tune))  # type: ignore[arg-type]
    pert = Perturbation(kind=cfg.zo.perturbation, run_seed=cfg.run.seed, shapes=ref_tuned.shapes)
    # Execute
    applied = replica.client.sync_to(acc)
    replay(ref_tuned, pert, acc)
    # Assert
    assert replica_key(cfg).device == "cpu"
    assert {p.device.type for p in replica.model.parameters()} == {"cpu"}
    assert {t.device.type for t in replica.client.stepper.tuned.tensors} == {"cpu"}
    assert {p.dtype for p in replica.model.parameters()} == {torch.float32}
    assert applied == np.count_nonzero(acc)
    expected = torch.cat([t.detach().reshape(-1) for t in ref_tuned.tensors])
    assert torch.equal(weights(replica), expected)


def test_replica_key_holds_the_resolved_device(run_cfg: Any) -> None:
    auto, cpu = (replica_key(run_cfg(**{"model.device": d})) for d in ("auto", "cpu"))
    assert auto.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert (auto == cpu) == (not torch.cuda.is_available())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_and_cuda_replicas_agree_on_fingerprint_and_replayed_weights(run_cfg: Any, kind: str) -> None:
    # Prepare: one tiny model, one replica per device (a mixed federation of two nodes).
    cpu = build_replica(run_cfg(**{"model.device": "cpu", "zo.perturbation": kind}))
    cuda = build_replica(run_cfg(**{"model.device": "cuda", "zo.perturbation": kind}))
    num_seeds = cpu.client.num_seeds
    first, second = accumulator(num_seeds, seed=2), accumulator(num_seeds, seed=3)
    # Assert: the CUDA replica really lives on the GPU, in fp32, and claims the same directions.
    assert {p.device.type for p in cuda.model.parameters()} == {"cuda"}
    assert {t.device.type for t in cuda.client.stepper.tuned.tensors} == {"cuda"}
    assert {p.dtype for p in cuda.model.parameters()} == {torch.float32}
    assert cpu.fingerprint == cuda.fingerprint
    for target in (first, first + second):  # a full replay, then an incremental one
        # Execute
        for replica in (cpu, cuda):
            replica.client.sync_to(target)
        # Assert
        a, b = weights(cpu), weights(cuda)
        assert float((a - b).norm() / a.norm()) <= 1e-6
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_replica_steps_with_the_cpu_losses(run_cfg: Any) -> None:
    # Prepare
    cfg = run_cfg(**{"model.device": "cuda"})
    cpu, cuda = build_replica(run_cfg(**{"model.device": "cpu"})), build_replica(cfg)
    tok = load_tokenizer(cfg.model.name)
    batch = encode_examples(tok, ["Say yes.", "Say no."], ["yes", "no"], max_length=32)  # on the CPU
    # Execute: the stepper moves the batch to the tuned tensors' device itself.
    on_cpu, on_cuda = (r.client.stepper.step(batch, 5, 1e-2) for r in (cpu, cuda))
    # Assert
    assert not on_cuda.skipped and math.isfinite(on_cuda.projected_grad)
    assert on_cuda.loss_plus == pytest.approx(on_cpu.loss_plus, rel=1e-4)
    assert on_cuda.loss_minus == pytest.approx(on_cpu.loss_minus, rel=1e-4)
