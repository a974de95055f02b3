"""Tiny deterministic Llama models and token batches for the zeroth-order engine tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.data.batch import TokenBatch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 128


def build_tiny_model(*, seed: int = 0, tie: bool = True, std: float = 0.05) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
    )
    with torch.random.fork_rng(devices=[]):  # HF's own init draws from the global RNG; we overwrite it
        model: LlamaForCausalLM = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.train(False)
    return model


def build_batch(*, seed: int, rows: int = 4, length: int = 16, answer: int = 4, pad: int = 0) -> TokenBatch:
    """Random prompt, answer labels on the last ``answer`` real tokens, ``pad`` right-padded positions."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    real = length - pad
    labels[:, real - answer : real] = ids[:, real - answer : real]
    if pad:
        mask[:, real:] = 0
    return TokenBatch(ids, mask, labels)


@pytest.fixture
def tiny_model() -> Callable[..., LlamaForCausalLM]:
    return build_tiny_model


@pytest.fixture
def token_batch() -> Callable[..., TokenBatch]:
    return build_batch


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and OpenMP barriers crawl on a busy 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
