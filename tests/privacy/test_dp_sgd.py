"""DP-SGD through opacus on a tiny peft LoRA model: weights move (opacus#820), each example's gradient
is clipped to C before the noise, the noise has std sigma*C, empty Poisson batches still add noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.assets.models import tiny_causal_lm
from fedtune.config import LoRASection
from fedtune.data.batch import TokenBatch
from fedtune.data.collate import encode_examples
from fedtune.lora.fedit import adapter_arrays, add_lora, train_local_private
from fedtune.privacy import SecureGaussian
from fedtune.privacy.dp_sgd import DPSGDSettings, PrivateSteps, poisson_sample, train_dp_sgd
from fedtune.zo.loss import answer_loss_per_example

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PROMPTS = ["Movie review: a joy.\nPositive or negative?", "Movie review: a bore.\nPositive or negative?"]


@pytest.fixture
def batch(smollm_tokenizer: PreTrainedTokenizerBase) -> TokenBatch:
    return encode_examples(smollm_tokenizer, PROMPTS, ["positive", "negative"], max_length=48)


def _model(tok: PreTrainedTokenizerBase, *, nonzero_b: bool = True) -> PeftModel:
    base = tiny_causal_lm(vocab_size=len(tok), seed=0)
    base.to("cpu")  # type: ignore[arg-type]  # moved before peft wraps it (opacus#820)
    model = add_lora(base, LoRASection(rank=4, alpha=8), seed=0)
    if nonzero_b:  # lora_B = 0 gives lora_A a zero gradient; a nonzero B exercises both
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


class _RecordingNoise(SecureGaussian):
    """Sees what opacus would noise (the clipped sum) and adds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def normal_like(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        self.seen.append(tensor.detach().clone())
        return torch.zeros_like(tensor)


def _params(model: PeftModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _manual_grads(model: PeftModel, batch: TokenBatch) -> list[torch.Tensor]:
    """Each example's gradient (all trainable tensors flattened), one backward pass per example."""
    out = []
    base = model.get_base_model()
    for i in range(batch.input_ids.shape[0]):
        one = TokenBatch(batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1], batch.labels[i : i + 1])
        model.zero_grad(set_to_none=True)
        answer_loss_per_example(base, one).sum().backward()  # type: ignore[no-untyped-call]
        out.append(torch.cat([p.grad.flatten() for p in _params(model)]))  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    return out


def _one_step(
    model: PeftModel, batch: TokenBatch | None, noise: SecureGaussian, *, clip: float, lr: float = 0.0
) -> PrivateSteps:
    base = model.get_base_model()
    params = _params(model)
    return train_dp_sgd(
        base,
        params,
        optimizer=torch.optim.SGD(params, lr=lr),
        per_example_loss=lambda b: answer_loss_per_example(base, b),
        batch_for_step=lambda t: batch,
        steps=1,
        settings=DPSGDSettings(noise_multiplier=1.0, clip=clip, expected_batch_size=2),
        noise=noise,
    )


def test_one_private_step_changes_the_lora_weights(
    smollm_tokenizer: PreTrainedTokenizerBase, batch: TokenBatch
) -> None:
    """opacus#820: LoRA weights silently not updated under DP-SGD."""
    model = _model(smollm_tokenizer, nonzero_b=False)
    before = adapter_arrays(model)
    settings = DPSGDSettings(noise_multiplier=0.5, clip=1.0, expected_batch_size=2)
    res = train_local_private(
        model, batch_for_step=lambda t: batch, steps=1, lr=1e-2, key=(0, 1, 0), settings=settings
    )
    after = adapter_arrays(model)
    assert res.steps == 1 and res.empty_steps == 0 and np.isfinite(res.train_loss)
    for kind in ("lora_A", "lora_B"):
        assert any(not np.array_equal(after[k], before[k]) for k in before if kind in k), kind
    # the hooks are gone: the process-cached model trains again, privately or not
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    train_local_private(
        model, batch_for_step=lambda t: batch, steps=1, lr=1e-2, key=(0, 2, 0), settings=settings
    )


def test_each_examples_gradient_is_clipped_to_c_before_the_noise(
    smollm_tokenizer: PreTrainedTokenizerBase, batch: TokenBatch
) -> None:
    model = _model(smollm_tokenizer)
    grads = _manual_grads(model, batch)
    raw = [float(g.norm()) for g in grads]
    clip = 0.25 * min(raw)  # both examples are over the bound
    noise = _RecordingNoise()
    _one_step(model, batch, noise, clip=clip)
    summed = torch.cat([t.flatten() for t in noise.seen])
    expected = sum(g * min(1.0, clip / (n + 1e-6)) for g, n in zip(grads, raw, strict=True))
    assert isinstance(expected, torch.Tensor)
    torch.testing.assert_close(summed, expected, rtol=1e-4, atol=1e-7)
    assert float(summed.norm()) <= 2 * clip * (1 + 1e-5)
    # one example: the clipped gradient itself, of norm exactly C (it was over the bound)
    one = TokenBatch(batch.input_ids[:1], batch.attention_mask[:1], batch.labels[:1])
    single = _RecordingNoise()
    _one_step(model, one, single, clip=clip)
    norm = float(torch.cat([t.flatten() for t in single.seen]).norm())
    assert norm == pytest.approx(clip, rel=1e-4)
    # under the bound: untouched
    loose = _RecordingNoise()
    _one_step(model, one, loose, clip=10 * max(raw))
    torch.testing.assert_close(torch.cat([t.flatten() for t in loose.seen]), grads[0], rtol=1e-4, atol=1e-7)


def test_noise_std_is_sigma_c_and_an_empty_batch_still_adds_it(
    smollm_tokenizer: PreTrainedTokenizerBase,
) -> None:
    model = _model(smollm_tokenizer)
    params = _params(model)
    sigma, clip, expected_batch = 1.5, 0.2, 4
    before = torch.cat([p.detach().flatten().clone() for p in params])
    base = model.get_base_model()
    done = train_dp_sgd(
        base,
        params,
        optimizer=torch.optim.SGD(params, lr=1.0),
        per_example_loss=lambda b: answer_loss_per_example(base, b),
        batch_for_step=lambda t: None,  # every Poisson sample empty: the update is noise alone
        steps=3,
        settings=DPSGDSettings(noise_multiplier=sigma, clip=clip, expected_batch_size=expected_batch),
    )
    assert done.steps == 3 and done.empty_steps == 3 and done.examples == 0 and done.losses == ()
    moved = (before - torch.cat([p.detach().flatten() for p in params])).numpy().astype(np.float64)
    # 3 SGD steps, each -(noise / B): the sum of 3 draws has std sqrt(3) sigma C / B
    z = moved * expected_batch / (sigma * clip * np.sqrt(3))
    assert z.size >= 4096  # 1% standard error on the std
    assert abs(z.mean()) < 0.07 and z.std() == pytest.approx(1.0, rel=0.05)


def test_poisson_sample_keeps_each_example_with_probability_q() -> None:
    rng = SecureGaussian()
    sizes = np.array([poisson_sample(50, 0.1, rng).size for _ in range(4000)])
    assert sizes.mean() == pytest.approx(5.0, rel=0.05)
    assert (sizes == 0).any()  # empty samples happen (P = 0.9^50 ~ 0.5%)
    idx = poisson_sample(50, 1.0, rng)
    assert np.array_equal(idx, np.arange(50))
    for n, q in ((0, 0.5), (10, 0.0), (10, 1.5), (10, float("nan"))):
        with pytest.raises(ValueError):
            poisson_sample(n, q, rng)


def test_settings_and_parameter_sets_are_checked(
    smollm_tokenizer: PreTrainedTokenizerBase, batch: TokenBatch
) -> None:
    for sigma, clip, b in ((0.0, 1.0, 1), (1.0, 0.0, 1), (1.0, 1.0, 0), (float("inf"), 1.0, 1)):
        with pytest.raises(ValueError):
            DPSGDSettings(noise_multiplier=sigma, clip=clip, expected_batch_size=b)
    model = _model(smollm_tokenizer)
    params = _params(model)[:-1]  # one trainable tensor would escape clipping
    with pytest.raises(ValueError, match="exactly the module's requires_grad parameters"):
        train_dp_sgd(
            model.get_base_model(),
            params,
            optimizer=torch.optim.SGD(params, lr=0.1),
            per_example_loss=lambda b: answer_loss_per_example(model.get_base_model(), b),
            batch_for_step=lambda t: batch,
            steps=1,
            settings=DPSGDSettings(1.0, 1.0, 2),
        )
