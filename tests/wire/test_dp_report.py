"""DPFigures: the validated form of a reply's DPReport, and its exact protobuf round trip."""

from __future__ import annotations

import pytest

from fedtune._proto.v1 import privacy_pb2 as pb
from fedtune.wire.dp_report import DPFigures


def test_round_trip_through_the_message_is_exact() -> None:
    f = DPFigures(noise_multiplier=0.873, sample_rate=8 / 317, steps=40, clip=1e-3)
    msg = pb.DPReport.FromString(f.to_pb().SerializeToString())
    assert DPFigures.from_pb(msg) == f


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.0 + 1e-9}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"clip": -1.0}, "clip"),
        ({"clip": float("nan")}, "clip"),
    ],
)
def test_figures_no_honest_client_sends_are_refused(kw: dict[str, float], match: str) -> None:
    args: dict[str, float] = {"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 1, "clip": 1.0, **kw}
    with pytest.raises(ValueError, match=match):
        DPFigures(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        DPFigures.from_pb(pb.DPReport(**args))  # type: ignore[arg-type]


def test_an_empty_report_is_refused() -> None:
    """A DPReport with every field at its proto3 default (a client that set nothing) is not figures."""
    with pytest.raises(ValueError):
        DPFigures.from_pb(pb.DPReport())
