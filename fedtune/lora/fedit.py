"""LoRA-FedAvg, the FedIT baseline (Zhang et al., "Towards Building the Federated GPT: Federated
Instruction Tuning", ICASSP 2024): peft LoRA adapters trained locally with AdamW, averaged by
the server. Flower-free; :mod:`fedtune.flower.lora_apps` wires it to Flower.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from fedtune.config import LoRASection
from fedtune.data.batch import TokenBatch
from fedtune.privacy.dp_sgd import DPSGDSettings, train_dp_sgd
from fedtune.privacy.noise import SecureGaussian
from fedtune.zo.loss import answer_loss, answer_loss_per_example

LORA_INIT_TAG = 0x10BA
LORA_DROPOUT_TAG = 0xD0D0
# Attention projections of Llama-style decoders (SmolLM2): the FedIT / FlowerTune choice.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
AdapterArrays = dict[str, npt.NDArray[np.float32]]


def add_lora(model: PreTrainedModel, cfg: LoRASection, *, seed: int) -> PeftModel:
    """Wrap ``model`` with LoRA adapters, initialised from an explicit generator.

    peft's default init draws from torch's global RNG; re-drawing lora_A from a keyed generator
    (same kaiming-uniform bound, lora_B = 0 as in LoRA) makes the starting adapter reproducible
    without seeding anything global.
    """
    # peft draws its initial lora_A from torch's global RNG (the CUDA one for a model already on the
    # GPU, as opacus#820 asks); fork them so that draw leaves no trace.
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        peft_model = _wrap(model, cfg)
    init_lora_weights(peft_model, seed=seed)
    for module in peft_model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for adapter, layer in list(drops.items()):
                if isinstance(layer, torch.nn.Dropout):
                    drops[adapter] = KeyedDropout(layer.p)
    return peft_model


def init_lora_weights(model: torch.nn.Module, *, seed: int) -> None:
    """Redraw every lora_A from a generator keyed by ``seed`` and zero every lora_B.

    The same kaiming-uniform bound peft uses, but from an explicit generator, so the starting
    adapter is identical in every process and the global RNG is never read.
    """
    key = int(np.random.SeedSequence([LORA_INIT_TAG, seed]).generate_state(1)[0])
    gen = torch.Generator().manual_seed(key)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name:
                bound = 1.0 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) on fan_in
                param.copy_(torch.rand(param.shape, generator=gen) * 2 * bound - bound)
            elif "lora_B" in name:
                param.zero_()


class KeyedDropout(torch.nn.Module):
    """Inverted dropout whose masks come from an explicit generator.

    Written by hand because ``nn.Dropout`` (what peft puts before each LoRA A) can only draw from
    torch's global RNG; :func:`train_local` gives every call a generator keyed by (run seed,
    round, partition), so FedIT rounds are reproducible and the global RNG is never touched.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            raise RuntimeError("LoRA dropout has no key: train through fedtune.lora.train_local(key=...)")
        keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


def _wrap(model: PreTrainedModel, cfg: LoRASection) -> PeftModel:
    return get_peft_model(
        model,
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(DEFAULT_TARGETS),
            task_type="CAUSAL_LM",
        ),
    )


def adapter_arrays(model: PeftModel) -> AdapterArrays:
    """The trainable adapter tensors as float32 numpy arrays, by parameter name."""
    return {
        name: p.detach().to("cpu", torch.float32).numpy().copy()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_adapter_arrays(model: PeftModel, arrays: Mapping[str, npt.NDArray[np.float32]]) -> None:
    """Copy ``arrays`` into the adapter; names and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unknown = set(params) - set(arrays), set(arrays) - set(params)
    if missing or unknown:
        raise ValueError(
            f"adapter arrays do not match the model: missing {sorted(missing)[:3]}, "
            f"unknown {sorted(unknown)[:3]}; "
            "server and clients must use the same model and lora.rank"
        )
    # Check every shape before copying any, so a bad set leaves the adapter as it was.
    for name, p in params.items():
        shape = np.shape(arrays[name])
        if shape != tuple(p.shape):
            raise ValueError(
                f"adapter {name}: shape {shape}, expected {tuple(p.shape)}; "
                "server and clients must use the same model and lora.rank"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.array(arrays[name], dtype=np.float32, copy=True)))


@dataclass(frozen=True)
class LocalResult:
    train_loss: float
    steps: int
    #: DP-SGD only: local steps whose Poisson sample was empty (they still added noise).
    empty_steps: int = 0


def _trainable(model: PeftModel) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; wrap it with add_lora first")
    return params


@contextlib.contextmanager
def _keyed_training(model: PeftModel, key: tuple[int, ...], device: torch.device) -> Iterator[None]:
    """Train mode with every :class:`KeyedDropout` drawing from one generator keyed by ``key``."""
    seed = int(np.random.SeedSequence([LORA_DROPOUT_TAG, *key]).generate_state(1)[0])
    dropout_gen = torch.Generator(device=device).manual_seed(seed)
    drops = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    for drop in drops:  # one stream, consumed in the model's (fixed) forward order
        drop.generator = dropout_gen
    model.train()
    try:
        yield
    finally:
        model.eval()
        for drop in drops:
            drop.generator = None


def train_local(
    model: PeftModel,
    *,
    batch_for_step: Callable[[int], TokenBatch],
    steps: int,
    lr: float,
    key: tuple[int, ...],
) -> LocalResult:
    """FedIT local update: a fresh AdamW for this round's steps (optimizer state is not shared).

    ``key`` (run seed, round, partition) seeds the generator of every :class:`KeyedDropout`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}; raise lora.local_steps")
    params = _trainable(model)
    device = params[0].device
    base = model.get_base_model()  # the decoder with LoRA layers injected in place
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    with _keyed_training(model, key, device):
        for t in range(steps):
            loss = answer_loss(base, batch_for_step(t).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
    return LocalResult(train_loss=float(np.mean(losses)), steps=steps)


def train_local_private(
    model: PeftModel,
    *,
    batch_for_step: Callable[[int], TokenBatch | None],
    steps: int,
    lr: float,
    key: tuple[int, ...],
    settings: DPSGDSettings,
    noise: SecureGaussian | None = None,
) -> LocalResult:
    """The FedIT local update as DP-SGD (sample-level DP): opacus per-sample gradients of the LoRA
    matrices, each example's gradient clipped to ``settings.clip``, secure noise, AdamW on the result.

    ``batch_for_step(t)`` is the step's Poisson sample (None when empty). Each example's loss is its
    own mean answer-token cross-entropy, so one example cannot move another's gradient. AdamW only
    post-processes the noised gradients, so the privacy guarantee is DP-SGD's.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}; raise lora.local_steps")
    params = _trainable(model)
    device = params[0].device
    base = model.get_base_model()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def per_example_loss(batch: TokenBatch) -> torch.Tensor:
        return answer_loss_per_example(base, batch.to(device))

    with _keyed_training(model, key, device):
        done = train_dp_sgd(
            base,
            params,
            optimizer=opt,
            per_example_loss=per_example_loss,
            batch_for_step=batch_for_step,
            steps=steps,
            settings=settings,
            noise=noise,
        )
    loss = float(np.mean(done.losses)) if done.losses else 0.0
    return LocalResult(train_loss=loss, steps=steps, empty_steps=done.empty_steps)
