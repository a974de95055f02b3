"""A FedKSeed node's weights on disk: the tuned tensors it last held and the exact coefficients C they hold.

In a Flower deployment every message starts a fresh ``flwr-clientapp`` process, so without this a
round pays a model load plus a replay of every non-zero seed from theta_0 (up to K full-model
regenerations). With it, a round pays the load, a check of this file and a replay of target - C:
only the seeds that changed since this node's last round.

The file is one safetensors file (memory-mapped on load) written to a temporary name and renamed,
so a reader sees the old state or the new one, never half of each. Its metadata names the format,
the fingerprint of the model and perturbation, the coefficient count, and a sha256 over every
tensor's bytes. A file that is missing, of another format, fingerprint or shape, or whose bytes do
not match the digest is ignored (with a logged reason): the caller keeps the pretrained weights
and replays in full, so a bad file costs time and never yields wrong weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from fedtune.zo.params import TunedParameters

log = logging.getLogger(__name__)

WEIGHTS_FILE = "fedkseed-weights.safetensors"
STATE_FORMAT = "fedtune-node-weights/1"
_COEFFICIENTS = "coefficients"


def _tensor_key(position: int) -> str:
    return f"tuned.{position:05d}"


def _digest(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        # A uint8 view of any dtype (bf16 too), handed to hashlib as a buffer: no copy on the CPU.
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


@dataclass(frozen=True)
class LoadedWeights:
    """A verified state file: CPU tensors (memory-mapped) in tuned order and the coefficients they hold."""

    tensors: tuple[torch.Tensor, ...]
    coefficients: npt.NDArray[np.float64]
    server_round: int


def save_weights(
    path: Path,
    tuned: TunedParameters,
    coefficients: npt.NDArray[np.float64],
    *,
    fingerprint: str,
    server_round: int,
) -> None:
    """Write the tuned tensors and C atomically (temporary file, fsync, rename)."""
    from safetensors.torch import save_file

    coefficients = np.ascontiguousarray(coefficients, dtype=np.float64)
    tensors = [t.detach().to("cpu", copy=False).contiguous() for t in tuned.tensors]
    coeff = torch.from_numpy(coefficients.copy())
    payload = {_tensor_key(i): t for i, t in enumerate(tensors)}
    payload[_COEFFICIENTS] = coeff
    metadata = {
        "format": STATE_FORMAT,
        "fingerprint": fingerprint,
        "num_seeds": str(coefficients.size),
        "num_tensors": str(len(tensors)),
        "server_round": str(server_round),
        "sha256": _digest([*tensors, coeff]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(payload, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_weights(
    path: Path, tuned: TunedParameters, *, fingerprint: str, num_seeds: int
) -> LoadedWeights | None:
    """The verified state in ``path``, or None (and a logged reason) when it cannot be trusted."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
            meta = f.metadata() or {}
            problem = _check_metadata(meta, fingerprint=fingerprint, num_seeds=num_seeds, tuned=tuned)
            if problem is not None:
                log.warning("ignoring %s: %s; replaying from the pretrained weights", path, problem)
                return None
            tensors = tuple(f.get_tensor(_tensor_key(i)) for i in range(len(tuned.tensors)))
            coeff = f.get_tensor(_COEFFICIENTS)
    except Exception as exc:  # a truncated or garbled file: safetensors raises several types
        log.warning("ignoring %s: unreadable (%s); replaying from the pretrained weights", path, exc)
        return None
    for position, (t, p) in enumerate(zip(tensors, tuned.tensors, strict=True)):
        if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
            found, want = f"{t.dtype} {tuple(t.shape)}", f"{p.dtype} {tuple(p.shape)}"
            log.warning("ignoring %s: tensor %d is %s, the model's is %s", path, position, found, want)
            return None
    if coeff.dtype != torch.float64 or tuple(coeff.shape) != (num_seeds,):
        log.warning("ignoring %s: coefficients are %s %s", path, coeff.dtype, tuple(coeff.shape))
        return None
    if _digest([*tensors, coeff]) != meta["sha256"]:
        log.warning("ignoring %s: checksum mismatch (corrupt file); replaying from theta_0", path)
        return None
    values = coeff.numpy().astype(np.float64, copy=True)
    if not np.all(np.isfinite(values)):
        log.warning("ignoring %s: non-finite coefficients", path)
        return None
    return LoadedWeights(tensors=tensors, coefficients=values, server_round=int(meta["server_round"]))


def _check_metadata(
    meta: dict[str, str], *, fingerprint: str, num_seeds: int, tuned: TunedParameters
) -> str | None:
    if meta.get("format") != STATE_FORMAT:
        return f"format {meta.get('format')!r}, expected {STATE_FORMAT!r}"
    if meta.get("fingerprint") != fingerprint:
        return "written for another model, tuned selection or perturbation (fingerprint differs)"
    if meta.get("num_seeds") != str(num_seeds):
        return f"K={meta.get('num_seeds')}, this run uses K={num_seeds}"
    if meta.get("num_tensors") != str(len(tuned.tensors)):
        return f"{meta.get('num_tensors')} tensors, the model tunes {len(tuned.tensors)}"
    if not meta.get("sha256") or not meta.get("server_round", "").lstrip("-").isdigit():
        return "metadata lacks its checksum or round"
    return None
