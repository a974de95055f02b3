"""What the server sees of one client: an upload indistinguishable from uniform bytes, fresh each round."""

from __future__ import annotations

import numpy as np
from scipy.stats import chisquare  # type: ignore[import-untyped]

from fedtune.secagg.codec import encode_message

from .harness import node_ids, run_round


def test_a_masked_upload_of_zeros_looks_uniform() -> None:
    xs = {u: np.zeros(4096) for u in node_ids(3)}
    result = run_round(3, inputs=xs, length=4096)
    upload = result.masked[node_ids(3)[0]]
    raw = np.frombuffer(upload.masked.astype("<u8").tobytes(), dtype=np.uint8)
    counts = np.bincount(raw, minlength=256)
    # Fresh OS entropy every run: p > 1e-6 fails about once in a million runs by chance, while a real
    # bias (a short seed, a keystream reused across pairs) drives p to ~0 on 32 KB.
    assert chisquare(counts).pvalue > 1e-6
    assert len(encode_message(upload)) >= 8 * 4096  # the wire form carries the same masked words
    np.testing.assert_allclose(result.total, 0.0, atol=1e-12)


def test_the_same_input_uploads_differently_in_two_rounds() -> None:
    xs = {u: np.zeros(512) for u in node_ids(3)}
    first = run_round(3, inputs=xs, length=512, server_round=1).masked
    second = run_round(3, inputs=xs, length=512, server_round=2).masked
    for u in xs:
        same = np.count_nonzero(first[u].masked == second[u].masked)
        assert same == 0  # 2^-64 per word of a collision
