"""The cut: bottom + trunk reproduce the unsplit model exactly, at every supported depth."""

from __future__ import annotations

import pytest
import torch

from fedtune.assets.models import load_causal_lm, load_encoder, load_tokenizer
from fedtune.sap.split import Bottom, ClassifierHead, LMHead, Trunk, build_split, family_of

TEXTS = ["a great movie", "terrible, boring and far too long"]


@pytest.mark.parametrize("depth", [0, 1])
def test_encoder_split_reproduces_the_unsplit_encoder(depth: int) -> None:
    tok = load_tokenizer("minilm-l6")
    b = tok(TEXTS, padding=True, return_tensors="pt")
    parts = build_split("minilm-l6", "classification", depth, num_layers=2, num_classes=2, seed=0)
    hidden = load_encoder("minilm-l6", num_layers=2)(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    ref = (hidden * m).sum(1) / m.sum(1)
    with torch.no_grad():
        out = parts.trunk(parts.bottom(b["input_ids"], b["attention_mask"]), b["attention_mask"])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_encoder_depth0_bottom_is_the_word_embedding_before_positions_and_norm() -> None:
    base = load_encoder("minilm-l6", num_layers=2)
    bottom = Bottom(base, 0)
    ids = torch.tensor([[101, 2307, 3185, 102]])
    h = bottom(ids, torch.ones_like(ids))
    torch.testing.assert_close(h, base.embeddings.word_embeddings(ids), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [0, 1])
def test_decoder_split_reproduces_the_unsplit_decoder(depth: int, tiny_model_dir: object) -> None:
    name = str(tiny_model_dir)
    tok = load_tokenizer(name)
    b = tok(TEXTS, padding=True, return_tensors="pt")
    parts = build_split(name, "causal-lm", depth, num_layers=None, num_classes=0, seed=0)
    ref = load_causal_lm(name).get_decoder()(**b).last_hidden_state
    with torch.no_grad():
        out = parts.trunk(parts.bottom(b["input_ids"], b["attention_mask"]), b["attention_mask"])
    keep = b["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=0, atol=1e-5)
    assert isinstance(parts.head, LMHead)


def test_text_variant_trunk_takes_token_ids() -> None:
    tok = load_tokenizer("minilm-l6")
    b = tok(TEXTS, padding=True, return_tensors="pt")
    parts = build_split("minilm-l6", "classification", 0, num_layers=2, num_classes=2, seed=0)
    with torch.no_grad():
        from_ids = parts.trunk(b["input_ids"], b["attention_mask"])
        from_emb = parts.trunk(parts.bottom(b["input_ids"], b["attention_mask"]), b["attention_mask"])
    torch.testing.assert_close(from_ids, from_emb, rtol=0, atol=1e-6)


def test_depth_must_leave_the_trunk_a_block() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        Trunk(load_encoder("minilm-l6", num_layers=2), 2)


def test_task_and_model_family_must_agree(tiny_model_dir: object) -> None:
    with pytest.raises(ValueError, match="needs an encoder"):
        build_split(str(tiny_model_dir), "classification", 0, num_layers=None, num_classes=2, seed=0)
    with pytest.raises(ValueError, match="needs a decoder"):
        build_split("minilm-l6", "causal-lm", 0, num_layers=2, num_classes=0, seed=0)


def test_unsupported_model_type_names_the_supported_ones() -> None:
    model = load_encoder("minilm-l6", num_layers=1)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="supports model types bert"):
        family_of(model)


def test_classifier_head_init_is_keyed() -> None:
    a, b, c = ClassifierHead(8, 3, seed=1), ClassifierHead(8, 3, seed=1), ClassifierHead(8, 3, seed=2)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, c.linear.weight)
    assert torch.count_nonzero(a.linear.bias) == 0
