"""The DP figures a reply carries (``DPReport`` in ``proto/fedtune/v1/privacy.proto``), validated.

The server never takes them on trust: it recomputes what the run's privacy config implies and
rejects a reply whose figures differ, then accounts with its own numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune._proto.v1 import privacy_pb2 as pb
from fedtune.wire._validate import check_uint


@dataclass(frozen=True)
class DPFigures:
    """One sampled Gaussian mechanism applied ``steps`` times this round, with bound ``clip``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"DP noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(f"DP sample_rate must be in (0, 1], got {self.sample_rate}")
        check_uint("DP steps", self.steps, minimum=1)
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"DP clip must be > 0, got {self.clip}")

    def to_pb(self) -> pb.DPReport:
        return pb.DPReport(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            clip=self.clip,
        )

    @staticmethod
    def from_pb(msg: pb.DPReport) -> DPFigures:
        """Raises ValueError for figures no honest client sends."""
        return DPFigures(msg.noise_multiplier, msg.sample_rate, msg.steps, msg.clip)
