"""Versioned, atomic run checkpoints: one folder per saved round, one manifest naming the current.

A checkpoint is written into a fresh ``checkpoints/round-NNNNN`` folder (arrays as ``.npz``,
scalars and a SHA-256 of the arrays file in ``state.json``), then ``checkpoint.json`` (the
manifest) is replaced atomically to point at it; older folders are removed afterwards. A crash at
any point leaves either the old or the new checkpoint, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.aggregators.base import StateValue
from fedtune.runlog import atomic_write_text

FORMAT = "fedtune-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
ARRAYS = "arrays.npz"
SCALARS = "state.json"


@dataclass(frozen=True)
class Checkpoint:
    """What a run needs to continue: the round it completed, the server state, the loop's state."""

    server_round: int
    server_state: Mapping[str, StateValue]
    loop_state: Mapping[str, int | float | str | bool]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` and make it the run's current checkpoint; returns its folder."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{ckpt.server_round:05d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, int | float | str | bool] = {}
    for key, value in ckpt.server_state.items():
        if isinstance(value, np.ndarray):
            arrays[key] = value
        elif isinstance(value, bool | int | float | str):
            scalars[key] = value
        else:
            raise TypeError(f"server state {key!r} is a {type(value).__name__}; use arrays or scalars")
    np.savez(tmp / ARRAYS, **arrays)  # type: ignore[arg-type]
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "server_round": ckpt.server_round,
        "scalars": scalars,
        "loop": dict(ckpt.loop_state),
        "arrays_sha256": _sha256(tmp / ARRAYS),
    }
    (tmp / SCALARS).write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(
        run_dir / MANIFEST, json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "current": name})
    )
    for old in root.iterdir():
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the run's current checkpoint; ValueError naming the problem if absent or corrupt."""
    manifest = run_dir / MANIFEST
    if not manifest.is_file():
        raise ValueError(
            f"{run_dir} has no {MANIFEST}; it is not a fedtune run folder, or it saved no round yet"
        )
    try:
        head = json.loads(manifest.read_text(encoding="utf-8"))
        folder = run_dir / "checkpoints" / str(head["current"])
        doc = json.loads((folder / SCALARS).read_text(encoding="utf-8"))
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint of {run_dir} is unreadable ({exc}); it is corrupt") from exc
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint of {run_dir} is format {doc.get('format')!r} v{doc.get('version')!r}; "
            f"this fedtune reads {FORMAT} v{FORMAT_VERSION}"
        )
    if _sha256(folder / ARRAYS) != doc.get("arrays_sha256"):
        raise ValueError(f"{folder / ARRAYS} does not match its recorded SHA-256; the checkpoint is corrupt")
    state: dict[str, StateValue] = dict(doc["scalars"])
    with np.load(folder / ARRAYS, allow_pickle=False) as data:
        state.update({k: data[k] for k in data.files})
    return Checkpoint(server_round=int(doc["server_round"]), server_state=state, loop_state=dict(doc["loop"]))
