"""Model resolution, the one-time SmolLM2 conversion, slicing and the tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.assets import models
from fedtune.assets.models import (
    BUILTIN_MODELS,
    cache_dir,
    count_parameters,
    load_causal_lm,
    load_encoder,
    load_tokenizer,
    resolve_model_dir,
    tiny_causal_lm,
)


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDTUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "fedtune"


def test_builtin_names_resolve_to_hf_folders(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "minilm-l6"}
    lm_dir = resolve_model_dir("smollm2-135m")
    assert (lm_dir / "model.safetensors").is_file() and (lm_dir / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((lm_dir / "config.json").read_text())
    assert not [p for p in lm_dir.parent.iterdir() if p.name.startswith(".tmp-")]  # no leftovers
    assert (resolve_model_dir("minilm-l6") / "config.json").is_file()


def test_unknown_model_lists_builtin_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m") as info:
        resolve_model_dir("gpt2")
    assert "minilm-l6" in str(info.value)
    with pytest.raises(ValueError, match=r"config\.json"):
        resolve_model_dir(str(tmp_path))  # a folder, but not a model folder


def test_local_folder_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_smollm_tokenizer_has_chat_template_and_pad(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    assert smollm_tokenizer.chat_template is not None
    assert smollm_tokenizer.pad_token_id == smollm_tokenizer.eos_token_id
    assert smollm_tokenizer.eos_token == "<|im_end|>"
    assert len(smollm_tokenizer) == 49152


def test_two_layer_slice_gives_finite_logits(
    smollm_2layer: PreTrainedModel, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    # Prepare
    ids = smollm_tokenizer(["The capital of France is"], return_tensors="pt")
    # Execute
    with torch.inference_mode():
        logits = smollm_2layer(**ids).logits
    # Assert
    assert smollm_2layer.config.num_hidden_layers == 2
    assert len(smollm_2layer.model.layers) == 2
    assert not smollm_2layer.training
    assert next(smollm_2layer.parameters()).dtype == torch.float32
    assert logits.shape == (1, ids["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()
    assert count_parameters(smollm_2layer) == pytest.approx(35.4e6, rel=0.01)


def test_slice_keeps_the_real_weights_of_the_first_layers(smollm_2layer: PreTrainedModel) -> None:
    three = load_causal_lm("smollm2-135m", num_layers=3)
    for name, param in smollm_2layer.state_dict().items():
        assert torch.equal(param, three.state_dict()[name]), name


@pytest.mark.parametrize("bad", [0, -1, 31])
def test_num_layers_is_validated(bad: int) -> None:
    with pytest.raises(ValueError, match="num_layers"):
        load_causal_lm("smollm2-135m", num_layers=bad)


def test_encoder_slice_loads() -> None:
    enc = load_encoder("minilm-l6", num_layers=2)
    tok = load_tokenizer("minilm-l6")
    out = enc(**tok(["a fine film"], return_tensors="pt")).last_hidden_state
    assert enc.config.num_hidden_layers == 2
    assert len(cast(Any, enc).encoder.layer) == 2
    assert out.shape[-1] == 384 and torch.isfinite(out).all()


def test_tiny_lm_is_deterministic_and_leaves_global_rng_alone() -> None:
    # Prepare
    before = torch.random.get_rng_state()
    # Execute
    a = tiny_causal_lm(vocab_size=100, seed=3)
    b = tiny_causal_lm(vocab_size=100, seed=3)
    c = tiny_causal_lm(vocab_size=100, seed=4)
    # Assert
    assert torch.equal(before, torch.random.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # tied
    assert torch.equal(sa["model.norm.weight"], torch.ones(64))
    assert sa["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.1)


def test_tiny_lm_runs_on_the_real_vocab(
    tiny_lm: torch.nn.Module, smollm_tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = smollm_tokenizer(["hello world"], return_tensors="pt")
    out = tiny_lm(**ids, labels=ids["input_ids"])
    assert out.logits.shape[-1] == len(smollm_tokenizer)
    assert torch.isfinite(out.loss)
    assert count_parameters(tiny_lm) < 4_000_000


@pytest.mark.parametrize(
    "kwargs", [{"vocab_size": 0}, {"vocab_size": 10, "num_layers": 0}, {"vocab_size": 10, "hidden_size": 30}]
)
def test_tiny_lm_validates(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="tiny_causal_lm"):
        tiny_causal_lm(seed=0, **kwargs)


class _FakeModel:
    """Stands in for a transformers model in the conversion test; records the state it got."""

    def __init__(self, config: object) -> None:
        self.config = config
        self.generation_config = None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(1)}

    def save_pretrained(self, path: Path) -> None:
        (Path(path) / "config.json").write_text("{}")


class _FakeTok:
    def save_pretrained(self, path: Path) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")


def test_conversion_is_atomic_and_runs_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare: a fresh cache and fake loaders, so this tests the file handling, not the 20 s load.
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    calls: list[str] = []

    class FakeAutoLM:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> _FakeModel:
            calls.append("model")
            config = type("Cfg", (), {})()
            config.quantization_config = "q4_1"
            return _FakeModel(config)

    class FakeAutoTok:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> _FakeTok:
            return _FakeTok()

    monkeypatch.setattr(models, "AutoModelForCausalLM", FakeAutoLM)
    monkeypatch.setattr(models, "AutoTokenizer", FakeAutoTok)
    # Execute
    first = resolve_model_dir("smollm2-135m")
    second = resolve_model_dir("smollm2-135m")
    # Assert
    assert first == second == tmp_path / "models" / "smollm2-135m-instruct"
    assert calls == ["model"]
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "tokenizer.json"]
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]


def test_failed_conversion_leaves_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))

    class Boom:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> None:
            raise RuntimeError("simulated crash while reading the GGUF")

    monkeypatch.setattr(models, "AutoTokenizer", Boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_model_dir("smollm2-135m")
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_full_smollm2_answers_paris(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    from fedtune.data.collate import generate_answers

    lm = load_causal_lm("smollm2-135m")
    assert count_parameters(lm) == pytest.approx(134.5e6, rel=0.01)
    [reply] = generate_answers(
        lm, smollm_tokenizer, ["What is the capital of France?"], max_new_tokens=20, max_length=128
    )
    assert "Paris" in reply
