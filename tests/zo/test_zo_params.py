from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from fedtune.zo.params import ParamSelection, select_parameters


def test_all_counts_tied_weights_once_in_model_order(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    model = tiny_model(tie=True)
    tuned = select_parameters(model, ParamSelection())
    assert tuned.names == tuple(name for name, _ in model.named_parameters())
    assert "lm_head.weight" not in tuned.names
    assert tuned.numel == sum(p.numel() for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    untied = select_parameters(tiny_model(tie=False), ParamSelection())
    assert "lm_head.weight" in untied.names and untied.numel == tuned.numel + 128 * 64


def test_no_embeddings_excludes_embedding_and_head(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    tuned = select_parameters(tiny_model(tie=False), ParamSelection(mode="no-embeddings"))
    assert "model.embed_tokens.weight" not in tuned.names and "lm_head.weight" not in tuned.names
    assert "model.layers.0.self_attn.q_proj.weight" in tuned.names and "model.norm.weight" in tuned.names


def test_pattern_and_exclude(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    model = tiny_model()
    tuned = select_parameters(
        model, ParamSelection(mode="pattern", include=(r"layers\.1\.",), exclude=("mlp",))
    )
    assert tuned.names and all(".layers.1." in n and "mlp" not in n for n in tuned.names)
    no_norm = select_parameters(model, ParamSelection(exclude=("norm",)))
    assert not any("norm" in n for n in no_norm.names)


def test_adapters_mode_selects_lora_names(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    peft = pytest.importorskip("peft")
    with torch.random.fork_rng(devices=[]):  # LoRA init draws from the global RNG
        lora = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    tuned = select_parameters(lora, ParamSelection(mode="adapters"))
    assert len(tuned.names) == 8 and all("lora_" in n for n in tuned.names)
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(tiny_model(), ParamSelection(mode="adapters"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "some"}, "mode must be one of"),
        ({"mode": "pattern"}, "needs include and/or exclude"),
        ({"include": ("q_proj",)}, "only used with mode='pattern'"),
        ({"mode": "pattern", "include": ("(",)}, "not a valid regex"),
        ({"exclude": ["x"]}, "must be a tuple"),
    ],
)
def test_selection_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParamSelection(**kwargs)  # type: ignore[arg-type]


def test_float16_weights_are_rejected(tiny_model: Callable[..., LlamaForCausalLM]) -> None:
    model = tiny_model()
    for param in model.parameters():
        param.data = param.data.to(torch.float16)
    tuned = select_parameters(model, ParamSelection())
    with pytest.raises(ValueError, match="float32 master weights"):
        tuned.check_trainable()
