"""Which parameters a zeroth-order run perturbs, in a fixed order that every party reproduces.

The direction stream is keyed by a tensor's position in this order, so the order, the selected set and weight
tying must match across parties (``fedkseed.md`` §7.2); :mod:`fedtune.zo.fingerprint` checks that they do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

SelectionMode = Literal["all", "no-embeddings", "pattern", "adapters"]
SELECTION_MODES: tuple[str, ...] = get_args(SelectionMode)

_EMBEDDING_NAME = re.compile(r"(^|\.)(embed\w*|wte|wpe|lm_head)(\.|$)")


@dataclass(frozen=True)
class ParamSelection:
    """The tuned subset of a model's parameters.

    Parameters
    ----------
    mode
        ``"all"``: every parameter (FedKSeed and MeZO full-parameter tuning). ``"no-embeddings"``: all but
        the input/output embeddings and ``lm_head`` (half of a small model's weights sit in its tied
        embedding). ``"pattern"``: names matching any ``include`` regex (all names if ``include`` is empty).
        ``"adapters"``: names containing ``"lora_"`` (MeZO over a PEFT model).
    include
        Regexes (``re.search``) a name must match; only meaningful with ``mode="pattern"``.
    exclude
        Regexes that drop a name in any mode.
    """

    mode: SelectionMode = "all"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in SELECTION_MODES:
            raise ValueError(f"mode must be one of {SELECTION_MODES}, got {self.mode!r}")
        for field_name in ("include", "exclude"):
            patterns = getattr(self, field_name)
            if not isinstance(patterns, tuple) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"{field_name} must be a tuple of regex strings, e.g. (r'layers\\.0\\.',)")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{field_name} pattern {pattern!r} is not a valid regex: {err}") from err
        if self.include and self.mode != "pattern":
            raise ValueError(f"include is only used with mode='pattern' (mode is {self.mode!r})")
        if self.mode == "pattern" and not (self.include or self.exclude):
            raise ValueError("mode='pattern' needs include and/or exclude regexes; use mode='all' otherwise")

    def matches(self, name: str, *, is_embedding: bool) -> bool:
        """Whether a parameter with this name is tuned."""
        if any(re.search(p, name) for p in self.exclude):
            return False
        if self.mode == "no-embeddings":
            return not is_embedding
        if self.mode == "adapters":
            return "lora_" in name
        if self.mode == "pattern":
            return not self.include or any(re.search(p, name) for p in self.include)
        return True


@dataclass(frozen=True)
class TunedParameters:
    """The selected tensors in ``model.named_parameters()`` order, each listed once (tied weights too)."""

    names: tuple[str, ...]
    tensors: tuple[nn.Parameter, ...]

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.tensors):
            raise ValueError("TunedParameters needs one name per tensor and at least one tensor")

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(s) for s in t.shape) for t in self.tensors)

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(str(t.dtype).removeprefix("torch.") for t in self.tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def check_trainable(self) -> None:
        """Raise unless every tensor is contiguous float32, as exact ZO updates need (fedkseed.md §7.3)."""
        for name, tensor in zip(self.names, self.tensors, strict=True):
            if tensor.dtype != torch.float32:
                raise ValueError(
                    f"{name} is {tensor.dtype}; zeroth-order updates need float32 master weights "
                    "(load the model with torch_dtype=torch.float32)"
                )
            if not tensor.is_contiguous():
                raise ValueError(f"{name} is not contiguous; call .data = .data.contiguous() first")


def _embedding_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            ids.add(id(weight))
    return ids


def select_parameters(model: nn.Module, selection: ParamSelection) -> TunedParameters:
    """Pick the tuned tensors and switch autograd off for the whole model (ZO needs no gradients)."""
    embeddings = _embedding_ids(model)
    names: list[str] = []
    tensors: list[nn.Parameter] = []
    for name, param in model.named_parameters():  # remove_duplicate=True: a tied weight appears once
        param.requires_grad_(False)
        is_embedding = id(param) in embeddings or bool(_EMBEDDING_NAME.search(name))
        if selection.matches(name, is_embedding=is_embedding):
            names.append(name)
            tensors.append(param)
    if not names:
        raise ValueError(
            f"{selection} selects no parameter of {type(model).__name__}; check the mode and regexes "
            "against [name for name, _ in model.named_parameters()]"
        )
    return TunedParameters(tuple(names), tuple(tensors))
