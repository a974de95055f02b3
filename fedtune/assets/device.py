"""Resolve ``model.device`` to the torch device a process runs its model on.

One place decides, so a client, the server's evaluator and a benchmark given the same spec land on the
same device, and a missing GPU fails at start with the fix rather than deep inside a forward pass.
"""

from __future__ import annotations

import torch

from fedtune.config import is_device_spec

__all__ = ["resolve_device"]

_NO_CUDA_FIX = (
    'install a CUDA build of torch into the venv (see the README, "GPU clients") or set model.device = "cpu"'
)


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the current GPU when torch sees one, else ``cpu``; ``cuda`` -> the current GPU (``cuda:0``
    unless changed), ``cuda:N`` -> GPU N.

    Raises ``ValueError`` for a malformed spec, and for a CUDA device this process cannot use (no CUDA
    build of torch, no visible GPU, or N out of range).
    """
    if not is_device_spec(spec):
        raise ValueError(
            f"model.device = {spec!r} is not a device; use auto, cpu, cuda or cuda:N (N = GPU index)"
        )
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto" and not available:
        return torch.device("cpu")
    if not available:
        reason = (
            "this torch is a CPU-only build"
            if torch.version.cuda is None
            else "torch sees no GPU (check the driver and CUDA_VISIBLE_DEVICES)"
        )
        raise ValueError(f"model.device = {spec!r} but {reason}; {_NO_CUDA_FIX}")
    if spec in ("auto", "cuda"):
        # The current GPU by index, so tensors' devices compare equal to it (cuda != cuda:0 in torch).
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(spec.removeprefix("cuda:")), torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"model.device = {spec!r} but this process sees {count} GPU(s) (cuda:0 to cuda:{count - 1}); "
            'pick an index in that range, "cuda" for the first, or model.device = "cpu"'
        )
    return torch.device("cuda", index)
