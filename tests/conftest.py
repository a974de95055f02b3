"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random Llama, a 2-layer real slice, data.

The first session converts SmolLM2 from its GGUF into the fedtune cache (~20-30 s); later
sessions reuse the folder (loads in well under a second).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from fedtune.assets.models import load_causal_lm, load_tokenizer, tiny_causal_lm  # noqa: E402
from fedtune.data.tasks import build_task  # noqa: E402


def _numpy_keys() -> np.ndarray:
    state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return np.array(state[1], copy=True)


@pytest.fixture(autouse=True)
def _global_rng_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test whose code seeds or draws from a global RNG (torch, numpy, random).

    Tests marked ``third_party_rng`` run code we do not own (Ray, Flower's runtime) that draws
    from ``random``; fedtune's own code is still covered by every other test.
    """
    if request.node.get_closest_marker("third_party_rng"):
        yield
        return
    torch_state = torch.random.get_rng_state()
    np_state = _numpy_keys()
    py_state = random.getstate()
    yield
    problems = []
    if not torch.equal(torch_state, torch.random.get_rng_state()):
        problems.append("torch")
    if not np.array_equal(np_state, _numpy_keys()):
        problems.append("numpy")
    if py_state != random.getstate():
        problems.append("random")
    if problems:
        pytest.fail(f"The global RNG state of {', '.join(problems)} changed; use an explicit generator")


@pytest.fixture(scope="session")
def smollm_tokenizer() -> PreTrainedTokenizerBase:
    """The real SmolLM2-135M-Instruct tokenizer (chat template, eos = pad = <|im_end|>)."""
    return load_tokenizer("smollm2-135m")


@pytest.fixture
def tiny_lm(smollm_tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A fresh random 2-layer, hidden-64 Llama over the SmolLM2 vocabulary (seed 0, ~3.2M params)."""
    return tiny_causal_lm(vocab_size=len(smollm_tokenizer), seed=0)


@pytest.fixture(scope="session")
def smollm_2layer() -> PreTrainedModel:
    """The first 2 layers of real SmolLM2 (35.4M params). Shared: tests must not modify it in place
    (deep-copy it first if they train)."""
    return load_causal_lm("smollm2-135m", num_layers=2)


@pytest.fixture(scope="session")
def reviews_task_small() -> datasets.Dataset:
    """200 examples of the reviews task (seed 0): prompt, answer, label, group."""
    return build_task("reviews", max_examples=200, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer: PreTrainedTokenizerBase
) -> Path:
    """A saved tiny random Llama with the real SmolLM2 tokenizer: a local model folder for run configs."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm(vocab_size=len(smollm_tokenizer), seed=0).save_pretrained(out)
    smollm_tokenizer.save_pretrained(out)
    return out


TINY_RUN: dict[str, Any] = {
    # The suite compares tensors with CPU references; GPU tests (marked gpu) ask for "cuda" themselves.
    "model.device": "cpu",
    "model.max-length": 48,
    "data.max-train-examples": 60,
    "data.heldout-size": 8,
    "data.eval-generations": 2,
    "data.max-new-tokens": 2,
    "fedkseed.num-seeds": 64,
    "zo.local-steps": 3,
    "zo.batch-size": 2,
    "zo.lr": 1e-2,
    "lora.local-steps": 2,
    "lora.batch-size": 2,
    "lora.lr": 1e-2,
    "federation.num-clients": 3,
    "federation.clients-per-round": 3,
    "federation.num-rounds": 2,
    "federation.node-wait-s": 1.0,
}


@pytest.fixture
def tiny_run_flat(tiny_model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """The dotted keys of a tiny run (random 2-layer Llama, 60 examples, K=64, 3 clients, 2 rounds)
    writing into this test's tmp_path."""
    return {**TINY_RUN, "model.name": str(tiny_model_dir), "run.output-dir": str(tmp_path / "runs")}


@pytest.fixture
def run_cfg(tiny_run_flat: dict[str, Any]) -> Any:
    """``run_cfg(**dotted_overrides) -> RunConfig`` for the tiny run of :func:`tiny_run_flat`."""
    from fedtune.config import RunConfig

    def make(**extra: Any) -> RunConfig:
        return RunConfig.from_flat({**tiny_run_flat, **extra})

    return make


@pytest.fixture
def fresh_models() -> Iterator[None]:
    """Drop process-cached models before and after, as a new process would start."""
    from fedtune.fedkseed.replica import clear_replicas
    from fedtune.lora.algorithm import clear_lora_models

    clear_replicas()
    clear_lora_models()
    yield
    clear_replicas()
    clear_lora_models()
