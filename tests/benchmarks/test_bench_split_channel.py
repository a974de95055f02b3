"""benchmarks/split_channel.py: bytes and latency of one payload over a real loopback channel (no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

BENCHMARK = "split_channel"


def _ordered(figures: dict[str, float]) -> bool:
    return 0 < figures["min"] <= figures["median"] <= figures["max"]


def test_classification_payload_bytes_and_latency(bench: Any) -> None:
    rows = bench.measure_payloads(["classification-standard"], reps=5, warmup=2)
    row = rows["classification-standard"]
    activations, mask, labels = 16 * 48 * 384 * 4, 16 * 48, 16 * 8
    assert row["raw_tensor_bytes_up"] == activations + mask + labels
    # protobuf adds field tags, lengths, shapes and dtype strings: a few dozen bytes, never less
    assert activations + mask + labels <= row["bytes_up_per_step"] < activations + mask + labels + 200
    assert 0 < row["bytes_down_per_step"] < 32  # the loss only: no tensor comes back
    assert row["messages_per_step"] == 1
    for key in ("stream_ms", "tls_stream_ms", "unary_ms"):
        assert _ordered(row[key]), (key, row[key])


def test_u_shaped_step_counts_both_messages(bench: Any) -> None:
    row = bench.measure_payloads(["classification-u-shaped"], reps=3, warmup=1, tls=False)[
        "classification-u-shaped"
    ]
    assert row["messages_per_step"] == 2
    assert row["bytes_up_per_step"] >= 16 * 48 * 384 * 4 + 16 * 384 * 4  # TRAIN activations + BACKWARD grad
    assert row["bytes_down_per_step"] >= 16 * 384 * 4  # the pooled trunk output
    assert "tls_stream_ms" not in row and "unary_ms" not in row
    assert _ordered(row["stream_ms"])


def test_unknown_payload_is_refused(bench: Any) -> None:
    with pytest.raises(ValueError, match="unknown payloads"):
        bench.measure_payloads(["no-such-payload"], reps=1)
