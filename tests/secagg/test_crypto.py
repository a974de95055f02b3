"""Primitives: key agreement is symmetric and bound to its use; sealed shares open only where they belong."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.secagg import crypto
from fedtune.secagg.errors import SecAggError, ShareDecryptionError


def _pair_key(run_key: str = "run", server_round: int = 1) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    a_sk, a_pk = crypto.generate_keypair()
    b_sk, b_pk = crypto.generate_keypair()
    k_ab = crypto.derive_key(a_sk, b_pk, crypto.SHARE_KEY, run_key, server_round, 1, 2)
    return k_ab, a_sk, a_pk, b_sk, b_pk


def test_agreement_is_symmetric_and_bound_to_purpose_run_round_and_pair() -> None:
    k_ab, a_sk, a_pk, b_sk, b_pk = _pair_key()
    assert crypto.derive_key(b_sk, a_pk, crypto.SHARE_KEY, "run", 1, 2, 1) == k_ab
    others = {
        crypto.derive_key(a_sk, b_pk, crypto.PAIR_MASK, "run", 1, 1, 2),
        crypto.derive_key(a_sk, b_pk, crypto.SHARE_KEY, "run2", 1, 1, 2),
        crypto.derive_key(a_sk, b_pk, crypto.SHARE_KEY, "run", 2, 1, 2),
        crypto.derive_key(a_sk, b_pk, crypto.SHARE_KEY, "run", 1, 1, 3),
    }
    assert k_ab not in others and len(others) == 4


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(ValueError):
        crypto.check_public_key(bytes(32))
    sk, _ = crypto.generate_keypair()
    with pytest.raises(SecAggError, match="key agreement between nodes 1 and 2"):
        crypto.derive_key(sk, bytes(32), crypto.PAIR_MASK, "run", 1, 1, 2)


def test_prg_is_deterministic_and_seed_dependent() -> None:
    a = crypto.prg(b"\x01" * 32, 1000)
    assert a.dtype == np.uint64 and a.shape == (1000,)
    np.testing.assert_array_equal(a, crypto.prg(b"\x01" * 32, 1000))
    np.testing.assert_array_equal(a[:10], crypto.prg(b"\x01" * 32, 10))
    assert not np.array_equal(a, crypto.prg(b"\x02" * 32, 1000))


def test_share_opens_with_the_right_aad() -> None:
    key = _pair_key()[0]
    ct = crypto.seal(key, b"share", crypto.share_aad("run", 1, 1, 2))
    assert crypto.open_sealed(key, ct, crypto.share_aad("run", 1, 1, 2), sender=1) == b"share"


@pytest.mark.parametrize(
    "aad",
    [
        crypto.share_aad("run", 2, 1, 2),  # replayed into another round
        crypto.share_aad("run", 1, 1, 3),  # to another receiver
        crypto.share_aad("run", 1, 2, 1),  # the other direction
        crypto.share_aad("other", 1, 1, 2),  # another run
    ],
)
def test_replayed_share_is_refused(aad: bytes) -> None:
    key = _pair_key()[0]
    ct = crypto.seal(key, b"share", crypto.share_aad("run", 1, 1, 2))
    with pytest.raises(ShareDecryptionError, match="from node 1") as info:
        crypto.open_sealed(key, ct, aad, sender=1)
    assert info.value.sender == 1


@pytest.mark.parametrize("position", [0, 20, -1])
def test_forged_share_is_refused(position: int) -> None:
    key = _pair_key()[0]
    aad = crypto.share_aad("run", 1, 1, 2)
    ct = bytearray(crypto.seal(key, b"share", aad))
    ct[position] ^= 0x01
    with pytest.raises(ShareDecryptionError, match="node 7"):
        crypto.open_sealed(key, bytes(ct), aad, sender=7)
    with pytest.raises(ShareDecryptionError, match="shorter"):
        crypto.open_sealed(key, b"tiny", aad, sender=7)
