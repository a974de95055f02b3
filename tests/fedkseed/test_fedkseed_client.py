"""FedKSeedClient: replay equals stepwise training, missed rounds sync exactly, sparse syncs, Pro sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.assets.models import load_causal_lm, load_tokenizer
from fedtune.data.collate import encode_examples
from fedtune.fedkseed.client import FedKSeedClient, NodeView, StaleSyncError, resolve_accumulator
from fedtune.wire.codec import SparseDelta, SyncPayload, quantize_probabilities
from fedtune.zo import MeZOStep, ParamSelection, ZOConfig, select_parameters

K = 32
FP = "fp"


def make_client(model_dir: Path, kind: str = "gaussian") -> FedKSeedClient:
    model = load_causal_lm(str(model_dir))
    tuned = select_parameters(model, ParamSelection())
    stepper = MeZOStep(model, tuned, ZOConfig(eps=1e-3, kind=kind), run_seed=7)  # type: ignore[arg-type]
    return FedKSeedClient(stepper, num_seeds=K, run_seed=7, fingerprint=FP)


def weights(client: FedKSeedClient) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in client.stepper.tuned.tensors])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def sync(
    rnd: int, acc: np.ndarray | SparseDelta, *, steps: int = 4, q: np.ndarray | None = None
) -> SyncPayload:
    return SyncPayload(
        server_round=rnd,
        lr=1e-2,
        eps=1e-3,
        num_local_steps=steps,
        batch_size=2,
        num_seeds=K,
        fingerprint=FP,
        accumulator=acc,
        quantized_probabilities=q,
    )


@pytest.fixture
def batch_fn(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    tok = load_tokenizer(str(tiny_model_dir))

    def fn(step: int):  # type: ignore[no-untyped-def]
        return encode_examples(tok, [f"Question {step}?", "Say yes."], ["yes", "no"], max_length=32)

    return fn


def test_local_training_equals_replay_of_its_coefficients(tiny_model_dir: Path, batch_fn) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    trained, fresh = make_client(tiny_model_dir), make_client(tiny_model_dir)
    # Execute: tau local steps, then rebuild the same model from theta0 by replaying C.
    reply, view = trained.train_round(
        sync(1, np.zeros(K, np.float32), steps=6),
        client_key=3,
        view=None,
        batch_for_step=batch_fn,
        num_examples=5,
    )
    fresh.sync_to(trained.coefficients)
    # Assert
    assert reply.seed_indices.size + reply.num_skipped_steps == 6
    assert rel_err(weights(fresh), weights(trained)) < 1e-6
    assert np.count_nonzero(trained.coefficients) == len(set(reply.seed_indices.tolist()))
    assert view.version == 1 and not view.accumulator.any()


def test_client_that_missed_rounds_syncs_to_the_same_weights(tiny_model_dir: Path, batch_fn) -> None:  # type: ignore[no-untyped-def]
    regular, returning = make_client(tiny_model_dir), make_client(tiny_model_dir)
    rng = np.random.default_rng(0)
    acc = np.zeros(K)
    for rnd in range(1, 4):
        regular.train_round(
            sync(rnd, acc.astype(np.float32)),
            client_key=1,
            view=None,
            batch_for_step=batch_fn,
            num_examples=5,
        )
        acc[rng.choice(K, 5, replace=False)] += rng.normal(0, 1e-2, 5)
    final = acc.astype(np.float32).astype(np.float64)
    replayed_regular = regular.sync_to(final)  # only what changed since its own round
    replayed_returning = returning.sync_to(final)  # everything, from theta0
    # The regular client also carries the fp32 rounding of 12 perturb/restore cycles (+eps z, -2 eps z,
    # +(eps - lr g) z, each rounded); the returning one only replay rounding. Both stay within 1e-5
    # of each other, far below one update (lr * g / |theta| ~ 1e-3 here).
    assert rel_err(weights(regular), weights(returning)) < 1e-5
    assert replayed_returning == np.count_nonzero(final)
    assert replayed_regular > 0


def test_sparse_sync_needs_the_matching_base(tmp_path: Path) -> None:
    base = NodeView(2, np.arange(K, dtype=np.float64))
    delta = SparseDelta(
        base_round=2, indices=np.array([1, 5], np.uint32), values=np.array([0.5, -1], np.float32)
    )
    full = resolve_accumulator(sync(3, delta), base)
    assert full[1] == 1.5 and full[5] == 4.0 and full[0] == 0.0
    with pytest.raises(StaleSyncError, match="holds round 1"):
        resolve_accumulator(sync(3, delta), NodeView(1, np.zeros(K)))
    with pytest.raises(StaleSyncError, match="holds nothing"):
        resolve_accumulator(sync(3, delta), None)
    # base 0 is relative to zero: any node applies it, whatever (if anything) it holds
    from_zero = SparseDelta(
        base_round=0, indices=np.array([1, 5], np.uint32), values=np.array([0.5, -1], np.float32)
    )
    for held in (None, base, NodeView(1, np.zeros(K))):
        full = resolve_accumulator(sync(3, from_zero), held)
        assert full[1] == 0.5 and full[5] == -1.0 and np.count_nonzero(full) == 2
    base.save(tmp_path / "n.npz")
    loaded = NodeView.load(tmp_path / "n.npz", K)
    assert loaded is not None and loaded.version == 2 and np.array_equal(loaded.accumulator, base.accumulator)
    assert NodeView.load(tmp_path / "n.npz", K + 1) is None  # another run's K: ignored, server sends dense


def test_fingerprint_mismatch_is_refused(tiny_model_dir: Path, batch_fn) -> None:  # type: ignore[no-untyped-def]
    client = make_client(tiny_model_dir)
    bad = SyncPayload(
        server_round=1,
        lr=1e-2,
        eps=1e-3,
        num_local_steps=1,
        batch_size=1,
        num_seeds=K,
        fingerprint="other",
        accumulator=np.zeros(K, np.float32),
    )
    with pytest.raises(ValueError, match="zo-check"):
        client.train_round(bad, client_key=1, view=None, batch_for_step=batch_fn, num_examples=1)


def test_pro_sampling_follows_the_quantized_probabilities(tiny_model_dir: Path) -> None:
    client = make_client(tiny_model_dir)
    scores = np.zeros(K)
    scores[4] = 1.0
    q = quantize_probabilities(scores)
    seeds = client.draw_seeds(sync(1, np.zeros(K, np.float32), steps=4000, q=q), client_key=1)
    share = np.mean(seeds == 4)
    expected = np.e / (np.e + K - 1)
    assert abs(share - expected) < 0.02
    uniform = client.draw_seeds(sync(1, np.zeros(K, np.float32), steps=4000), client_key=1)
    assert abs(np.mean(uniform == 4) - 1 / K) < 0.01
    again = client.draw_seeds(sync(1, np.zeros(K, np.float32), steps=4000), client_key=1)
    assert np.array_equal(uniform, again)  # keyed by (run seed, round, node): reproducible
