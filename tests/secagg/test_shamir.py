"""Shamir sharing over GF(2^521 - 1): any t of n reconstruct, t - 1 do not, bad input is refused."""

from __future__ import annotations

import itertools
import secrets

import pytest

from fedtune.secagg import shamir


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3), (6, 6)])
def test_any_t_of_n_reconstruct(n: int, t: int) -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, list(range(1, n + 1)), t)
    for subset in itertools.combinations(sorted(shares.items()), t):
        assert shamir.combine(subset, t) == secret
    assert shamir.combine(shares, t) == secret  # more than t: the first t are used


def test_t_minus_one_shares_say_nothing_useful() -> None:
    secret = bytes(range(32))
    shares = sorted(shamir.split(secret, [1, 2, 3, 4, 5], 3).items())
    value = shamir.interpolate_at_zero(shares[:2])
    assert value != int.from_bytes(secret, "big")
    with pytest.raises(ValueError, match="2 shares cannot reconstruct"):
        shamir.combine(shares[:2], 3)


def test_duplicate_points_are_refused() -> None:
    shares = sorted(shamir.split(bytes(32), [1, 2, 3], 2).items())
    with pytest.raises(ValueError, match="duplicate evaluation points"):
        shamir.combine([shares[0], shares[0]], 2)
    with pytest.raises(ValueError, match="duplicate evaluation points"):
        shamir.split(bytes(32), [1, 2, 2], 2)


def test_corrupt_share_is_detected() -> None:
    shares = sorted(shamir.split(secrets.token_bytes(32), [1, 2, 3], 2).items())
    bad = [(shares[0][0], secrets.randbelow(shamir.PRIME)), shares[1]]  # a garbled share
    with pytest.raises(ValueError, match="corrupt"):
        shamir.combine(bad, 2)


def test_share_bytes_round_trip_and_bounds() -> None:
    y = shamir.PRIME - 1
    data = shamir.share_to_bytes(y)
    assert len(data) == shamir.SHARE_BYTES == 66
    assert shamir.share_from_bytes(data) == y
    with pytest.raises(ValueError):
        shamir.share_from_bytes(shamir.PRIME.to_bytes(66, "big"))
    with pytest.raises(ValueError):
        shamir.share_from_bytes(b"\x00" * 65)


def test_bad_split_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split(b"short", [1, 2], 2)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(bytes(32), [1, 2], 3)
    with pytest.raises(ValueError, match="evaluation point"):
        shamir.split(bytes(32), [0, 1], 2)
