"""What two parties must agree on before they exchange seeds: the tuned tensors and the direction engine.

A seed index means the same direction only if names, shapes, order, dtypes, perturbation kind, run seed and
engine version all match; a z checksum then confirms the generated values, which catches a different torch
version or CPU instruction set (Gaussian) that the metadata cannot (``fedkseed.md`` §7.1).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

from fedtune.zo.params import ParamSelection, TunedParameters, select_parameters
from fedtune.zo.perturbation import (
    ENGINE_VERSION,
    PERTURBATION_KINDS,
    Perturbation,
    PerturbationKind,
    generator_id,
)


class IncompatibleModelError(ValueError):
    """Two parties would generate different directions for the same seed index."""


def _digest(items: object) -> str:
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Fingerprint:
    """Everything that determines z for a seed index, except the generated values themselves."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes_digest: str
    kind: PerturbationKind
    engine_version: str
    generator: str
    num_elements: int
    run_seed: int

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes) or not self.names:
            raise ValueError("a fingerprint needs one shape per name and at least one tensor")
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"kind must be one of {PERTURBATION_KINDS}, got {self.kind!r}")

    @classmethod
    def of(cls, tuned: TunedParameters, *, kind: PerturbationKind, run_seed: int) -> Fingerprint:
        numel = sum(t.numel() for t in tuned.tensors)
        return cls(
            tuned.names,
            tuned.shapes,
            _digest(tuned.dtypes),
            kind,
            ENGINE_VERSION,
            generator_id(kind),
            numel,
            run_seed,
        )

    @property
    def perturbation(self) -> Perturbation:
        return Perturbation(kind=self.kind, run_seed=self.run_seed, shapes=self.shapes)

    def z_checksum(self, seed_index: int) -> str:
        """Hex sha256 of z(seed_index) as little-endian float32, tensors in tuned order (CPU-generated)."""
        perturbation = self.perturbation
        digest = hashlib.sha256()
        for position in range(len(self.shapes)):
            z = perturbation.materialize(seed_index, position).reshape(-1)
            digest.update(z.numpy().astype("<f4", copy=False).tobytes())
        return digest.hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        try:
            raw = cast(dict[str, Any], json.loads(text))
            return cls(
                names=tuple(str(n) for n in raw["names"]),
                shapes=tuple(tuple(int(s) for s in shape) for shape in raw["shapes"]),
                dtypes_digest=str(raw["dtypes_digest"]),
                kind=raw["kind"],
                engine_version=str(raw["engine_version"]),
                generator=str(raw["generator"]),
                num_elements=int(raw["num_elements"]),
                run_seed=int(raw["run_seed"]),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
            raise ValueError(f"not a Fingerprint JSON document: {err}") from err


def _name_differences(local: Fingerprint, remote: Fingerprint) -> list[str]:
    out: list[str] = []
    local_set, remote_set = set(local.names), set(remote.names)
    if missing := [n for n in local.names if n not in remote_set]:
        out.append(f"tuned only locally: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra := [n for n in remote.names if n not in local_set]:
        out.append(f"tuned only remotely: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if not missing and not extra and local.names != remote.names:
        first = next(i for i, (a, b) in enumerate(zip(local.names, remote.names, strict=True)) if a != b)
        out.append(
            f"tensor order differs from position {first}: {local.names[first]!r} vs {remote.names[first]!r}"
        )
    remote_shapes = dict(zip(remote.names, remote.shapes, strict=True))
    for name, shape in zip(local.names, local.shapes, strict=True):
        if name in remote_shapes and remote_shapes[name] != shape:
            out.append(f"shape of {name}: {shape} locally vs {remote_shapes[name]} remotely")
    return out


def check_compatible(local: Fingerprint, remote: Fingerprint) -> None:
    """Raise :class:`IncompatibleModelError` listing every field that differs; return None when compatible."""
    problems: list[str] = []
    for field in ("engine_version", "generator", "kind", "run_seed", "dtypes_digest", "num_elements"):
        mine, theirs = getattr(local, field), getattr(remote, field)
        if mine != theirs:
            problems.append(f"{field}: {mine!r} locally vs {theirs!r} remotely")
    problems.extend(_name_differences(local, remote))
    if problems:
        raise IncompatibleModelError("models cannot share seeds; " + "; ".join(problems))


def zo_check_report(
    model: nn.Module,
    selection: ParamSelection,
    *,
    run_seed: int,
    kind: PerturbationKind,
    seed_index: int,
) -> dict[str, str | int]:
    """JSON-able summary for ``fedtune zo-check``: compare it across machines before a run."""
    fingerprint = Fingerprint.of(select_parameters(model, selection), kind=kind, run_seed=run_seed)
    return {
        "engine_version": fingerprint.engine_version,
        "generator": fingerprint.generator,
        "kind": fingerprint.kind,
        "run_seed": fingerprint.run_seed,
        "num_tensors": len(fingerprint.names),
        "num_elements": fingerprint.num_elements,
        "names_digest": _digest(fingerprint.names),
        "shapes_digest": _digest(fingerprint.shapes),
        "dtypes_digest": fingerprint.dtypes_digest,
        "torch_version": torch.__version__,
        "seed_index": seed_index,
        "z_checksum": fingerprint.z_checksum(seed_index),
    }
