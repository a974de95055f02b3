"""A node's ids tokenized once and kept on disk: same batches as tokenizing per batch, no reload of the
examples on a cache hit, and a changed source, tokenizer or damaged file never reuses stale ids."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from fedtune.config import RunConfig
from fedtune.data.collate import encode_examples
from fedtune.data.node import NodeData
from fedtune.data.sampler import BatchSampler
from fedtune.runtime.node import load_node_data

ROWS = {
    "prompt": [f"Review {i}: {'great' if i % 2 else 'dull'} film" for i in range(7)],
    "answer": ["positive" if i % 2 else "negative" for i in range(7)],
    "label": [str(i % 2) for i in range(7)],
}
KEY = (1, 2, 3)


def _ds() -> datasets.Dataset:
    return datasets.Dataset.from_dict(ROWS)


def _never() -> datasets.Dataset:
    raise AssertionError("the examples were loaded although their ids were cached")


def _equal(a: object, b: object) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "attention_mask", "labels"))


@pytest.mark.parametrize("sampling", ["shuffle", "class-balanced"])
def test_batches_equal_tokenizing_each_batch(
    smollm_tokenizer: PreTrainedTokenizerBase, sampling: str
) -> None:
    data = NodeData(_ds(), sampling=sampling)
    stream = data.batches(smollm_tokenizer, batch_size=3, max_length=12, key=KEY)
    labels = ROWS["label"] if sampling == "class-balanced" else None
    sampler = BatchSampler(num_examples=7, batch_size=3, key=KEY, labels=labels)
    for step in range(4):
        idx = sampler.next_indices()
        want = encode_examples(
            smollm_tokenizer,
            [ROWS["prompt"][i] for i in idx],
            [ROWS["answer"][i] for i in idx],
            max_length=12,
        )
        assert _equal(stream(step), want)


def test_a_cache_hit_skips_the_examples(smollm_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    first = NodeData(_ds, token_dir=tmp_path, source_key="src-1")
    a = first.batches(smollm_tokenizer, batch_size=2, max_length=16, key=KEY)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1
    again = NodeData(_never, token_dir=tmp_path, source_key="src-1")  # a fresh process, next round
    b = again.batches(smollm_tokenizer, batch_size=2, max_length=16, key=KEY)
    assert len(again) == 7
    assert all(_equal(a(s), b(s)) for s in range(3))


def test_another_source_or_tokenizer_tokenizes_again(
    smollm_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    NodeData(_ds, token_dir=tmp_path, source_key="src-1").tokenized(smollm_tokenizer)
    with pytest.raises(AssertionError, match="were loaded"):
        NodeData(_never, token_dir=tmp_path, source_key="src-2").tokenized(smollm_tokenizer)
    other = smollm_tokenizer.__class__.from_pretrained(smollm_tokenizer.name_or_path)
    other.add_tokens(["<extra-token>"])
    with pytest.raises(AssertionError, match="were loaded"):
        NodeData(_never, token_dir=tmp_path, source_key="src-1").tokenized(other)


@pytest.mark.parametrize("damage", [b"", b"garbage", None])
def test_a_damaged_cache_is_rebuilt(
    smollm_tokenizer: PreTrainedTokenizerBase, tmp_path: Path, damage: bytes | None
) -> None:
    NodeData(_ds, token_dir=tmp_path, source_key="s").tokenized(smollm_tokenizer)
    (path,) = tmp_path.glob("tokens-*.npz")
    if damage is None:  # a valid archive whose arrays disagree
        import numpy as np

        with np.load(path) as f:
            arrays = dict(f)
        arrays["prompt_offsets"] = arrays["prompt_offsets"][:-1]
        np.savez(path, **arrays)
        path = path.with_suffix(".npz")
    else:
        path.write_bytes(damage)
    rebuilt = NodeData(_ds, token_dir=tmp_path, source_key="s").tokenized(smollm_tokenizer)
    assert len(rebuilt) == 7


def test_node_with_a_data_file_caches_its_ids_and_sees_edits(
    smollm_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    cfg = RunConfig()
    file = tmp_path / "node.jsonl"
    file.write_text(
        "".join(
            json.dumps({"prompt": p, "answer": a}) + "\n"
            for p, a in zip(ROWS["prompt"], ROWS["answer"], strict=True)
        )
    )
    cache = tmp_path / "cache"
    node = {"partition-id": 0, "data-path": str(file)}
    assert len(load_node_data(cfg, node, token_dir=cache).tokenized(smollm_tokenizer)) == 7
    with file.open("a") as fh:
        fh.write(json.dumps({"prompt": "one more", "answer": "positive"}) + "\n")
    assert len(load_node_data(cfg, node, token_dir=cache).tokenized(smollm_tokenizer)) == 8
    assert len(list(cache.glob("tokens-*.npz"))) == 2


def test_a_nodes_batches_follow_the_runs_prompt_template(
    smollm_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """An algorithm that never mentions the template still formats its prompts the run's way."""
    file = tmp_path / "node.jsonl"
    file.write_text(json.dumps({"prompt": "Name a colour.", "answer": "blue"}) + "\n")
    node = {"partition-id": 0, "data-path": str(file)}
    alpaca = load_node_data(RunConfig.from_flat({"data.prompt-template": "alpaca"}), node)
    chat = load_node_data(RunConfig(), node)
    assert alpaca.template == "alpaca" and chat.template == "chat"
    ids = alpaca.tokenized(smollm_tokenizer).prompt(0)
    assert ids == alpaca.tokenized(smollm_tokenizer, template="alpaca").prompt(0)
    assert ids != chat.tokenized(smollm_tokenizer).prompt(0)
    assert "### Instruction:" in smollm_tokenizer.decode(ids)
