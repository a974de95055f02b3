"""The trunk's trainable state: training lowers the loss, steps are atomic, rounds roll back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.assets.models import load_tokenizer
from fedtune.data.tasks import build_task
from fedtune.sap.batches import SplitExamples
from fedtune.sap.encode import ClientEncoder
from fedtune.sap.noise import SecureNormal
from fedtune.sap.privatizer import DChiPrivatizer
from fedtune.sap.split import build_split
from fedtune.sap.trunk import SHARED, TrunkTrainer, add_trunk_lora


def _setup(lr: float = 5e-3) -> tuple[TrunkTrainer, SplitExamples, object]:
    parts = build_split("minilm-l6", "classification", 0, num_layers=2, num_classes=2, seed=0)
    trunk = add_trunk_lora(parts.trunk, rank=4, alpha=8, targets=(), seed=0)
    trainer = TrunkTrainer(trunk, parts.head, lr=lr)
    ds = build_task("reviews-text", max_examples=64, seed=0)
    examples = SplitExamples(
        ds,
        load_tokenizer("minilm-l6"),
        task="classification",
        class_names=("negative", "positive"),
        max_length=40,
    )
    return trainer, examples, parts.bottom


def _weights(trainer: TrunkTrainer, slot: str = SHARED) -> dict[str, torch.Tensor]:
    return {n: w.clone() for n, w in trainer.slot(slot).weights.items()}


@pytest.mark.parametrize("privatize", [False, True])
def test_training_on_privatized_inputs_lowers_the_loss(privatize: bool) -> None:
    trainer, examples, bottom = _setup()
    priv = DChiPrivatizer(200.0, rng=SecureNormal(bytes(32))) if privatize else None
    encoder = ClientEncoder(bottom, priv)  # type: ignore[arg-type]
    batch = examples.batch(range(16))
    x = encoder(batch, labelled=True).inputs
    losses = [trainer.train_step(SHARED, x, batch.attention_mask, batch.targets) for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0]


def test_rollback_restores_weights_and_optimizer_exactly() -> None:
    trainer, examples, bottom = _setup()
    batch = examples.batch(range(8))
    x = bottom(batch.input_ids, batch.attention_mask)
    trainer.train_step(SHARED, x, batch.attention_mask, batch.targets)
    before = _weights(trainer)
    steps = trainer.slot(SHARED).steps
    trainer.open_round()
    for _ in range(3):
        trainer.train_step(SHARED, x, batch.attention_mask, batch.targets)
    trainer.train_step("client-7", x, batch.attention_mask, batch.targets)
    trainer.rollback_round()
    assert set(trainer.slots) == {SHARED}
    after = _weights(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert trainer.slot(SHARED).steps == steps
    # Continuing after a rollback gives what continuing without the rolled-back round gives.
    twin, _, _ = _setup()
    twin.train_step(SHARED, x, batch.attention_mask, batch.targets)
    a = trainer.train_step(SHARED, x, batch.attention_mask, batch.targets)
    b = twin.train_step(SHARED, x, batch.attention_mask, batch.targets)
    assert a == b


def test_a_failed_step_leaves_no_trace() -> None:
    trainer, examples, bottom = _setup()
    batch = examples.batch(range(4))
    x = bottom(batch.input_ids, batch.attention_mask)
    before = _weights(trainer)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not usable"):
        trainer.train_step(SHARED, bad, batch.attention_mask, batch.targets)
    assert all(torch.equal(before[n], w) for n, w in _weights(trainer).items())
    assert trainer.slot(SHARED).steps == 0


def test_per_client_slots_are_independent() -> None:
    trainer, examples, bottom = _setup()
    batch = examples.batch(range(4))
    x = bottom(batch.input_ids, batch.attention_mask)
    trainer.train_step("client-1", x, batch.attention_mask, batch.targets)
    untouched = _weights(trainer, "client-2")
    assert all(torch.equal(untouched[n], trainer.initial[n]) for n in untouched)
    assert not all(torch.equal(w, trainer.initial[n]) for n, w in _weights(trainer, "client-1").items())


def test_state_dict_round_trip_continues_identically() -> None:
    trainer, examples, bottom = _setup()
    batch = examples.batch(range(4))
    x = bottom(batch.input_ids, batch.attention_mask)
    for slot in ("client-0", "client-1", "client-0"):
        trainer.train_step(slot, x, batch.attention_mask, batch.targets)
    state = trainer.state_dict()
    assert all(isinstance(v, int | float | str | np.ndarray) for v in state.values())
    restored, _, _ = _setup()
    restored.load_state_dict(state)
    a = trainer.train_step("client-0", x, batch.attention_mask, batch.targets)
    b = restored.train_step("client-0", x, batch.attention_mask, batch.targets)
    assert a == b
    assert restored.slot("client-0").steps == 3


def test_load_state_dict_refuses_another_model() -> None:
    trainer, _, _ = _setup()
    state = trainer.state_dict()
    state["params"] = "something.else"
    with pytest.raises(ValueError, match="differ"):
        trainer.load_state_dict(state)


def test_class_balanced_stream_alternates_classes() -> None:
    _, examples, _ = _setup()
    batch = examples.stream(8, key=(0, 1), balanced=True)()
    assert sorted(batch.targets.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
