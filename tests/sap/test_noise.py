"""SecureNormal: a keyed ChaCha20 stream of standard normals (fixed keys here only, for reproducibility)."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
from scipy import stats

from fedtune.sap import noise
from fedtune.sap.noise import SecureNormal

KEY = bytes(range(32))


def test_moments_of_standard_normal() -> None:
    x = SecureNormal(KEY).normal(200_000)
    assert x.dtype == np.float64 and x.shape == (200_000,)
    assert abs(x.mean()) < 0.01
    assert abs(x.std() - 1.0) < 0.01
    assert np.isfinite(x).all()
    assert stats.kstest(x, "norm").pvalue > 0.01


def test_same_key_same_stream_different_key_different() -> None:
    a = SecureNormal(KEY).normal(1000)
    b = SecureNormal(KEY).normal(1000)
    c = SecureNormal(bytes(range(1, 33))).normal(1000)
    np.testing.assert_array_equal(a, b)
    assert not np.any(a == c)


def test_consecutive_calls_continue_the_stream() -> None:
    g = SecureNormal(KEY)
    first, second = g.normal(1000), g.normal(1000)
    assert not np.any(first == second)
    # Even-sized calls consume whole pairs, so the stream splits exactly where the calls split.
    np.testing.assert_array_equal(np.concatenate([first, second]), SecureNormal(KEY).normal(2000))


def test_odd_and_empty_requests() -> None:
    g = SecureNormal(KEY)
    assert g.normal(0).shape == (0,)
    assert g.normal(7).shape == (7,)
    with pytest.raises(ValueError, match=">= 0"):
        g.normal(-1)
    with pytest.raises(TypeError):
        g.normal(2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(31), bytes(33), bytes(64)])
def test_bad_key_length_raises(key: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SecureNormal(key)


def test_random_keys_differ() -> None:
    assert not np.any(SecureNormal().normal(100) == SecureNormal().normal(100))


def test_cannot_be_copied() -> None:
    g = SecureNormal(KEY)
    with pytest.raises(TypeError, match="identical noise"):
        pickle.dumps(g)
    with pytest.raises(TypeError, match="identical noise"):
        copy.deepcopy(g)


def test_nonce_rotation_keeps_a_continuous_non_repeating_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(noise, "_SEGMENT_BYTES", 64 * 3)
    g = SecureNormal(KEY)
    words = g._words(200)  # 1600 bytes: crosses eight segments
    assert g._segment == 8
    assert np.unique(words).size == words.size
    # The first segment is the plain stream of nonce 0.
    np.testing.assert_array_equal(words[:24], SecureNormal(KEY)._words(24))


def test_concurrent_calls_share_the_stream_without_overlap() -> None:
    g = SecureNormal(KEY)
    results: list[np.ndarray] = []
    lock = threading.Lock()

    def draw() -> None:
        for _ in range(20):
            x = g._words(1000)
            with lock:
                results.append(x)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = np.concatenate(results)
    assert everything.size == 80_000
    assert np.unique(everything).size == everything.size
    np.testing.assert_array_equal(np.sort(everything), np.sort(SecureNormal(KEY)._words(80_000)))
