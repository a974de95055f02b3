from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from fedtune.zo.gaussian_jit import (
    LEVELS,
    add_gaussian_,
    add_gaussian_sum_,
    fill_gaussian_,
    gaussian_table,
    philox4x32,
    round_keys,
    table_digest,
)
from fedtune.zo.perturbation import Perturbation

# Random123's kat_vectors for philox4x32-10: counter (4 words), key (2 words), expected output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
KEY = round_keys((0x1234_5678, 0x9ABC_DEF0))


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_matches_the_known_answers(
    counter: tuple[int, int, int, int], key: tuple[int, int], expected: tuple[int, int, int, int]
) -> None:
    assert philox4x32(counter, key) == expected


def test_values_are_the_documented_layout() -> None:
    # value 8b + 2j + h = TABLE[((w_j >> 16h) & 0xFFFF) >> 4], w = Philox(counter (b, position, seed, 0))
    position, seed = 3, 77
    out = np.empty(40, dtype=np.float32)
    fill_gaussian_(out, KEY, position, seed)
    key = (int(KEY[0][0]), int(KEY[1][0]))
    expected = [
        gaussian_table()[((w >> (16 * h)) & 0xFFFF) >> 4]
        for b in range(5)
        for w in philox4x32((b, position, seed, 0), key)
        for h in range(2)
    ]
    assert np.array_equal(out, np.array(expected, dtype=np.float32))


def test_table_is_pinned_and_a_unit_normal() -> None:
    table = gaussian_table().astype(np.float64)
    # A platform whose quantiles rounded differently would change every direction: fail here first.
    assert table_digest() == "87d2297bd6f503ad9b582cb87a6d8d21e20633747144ac688b90f4efcde6a2e8"
    assert table.size == LEVELS and np.all(np.diff(table) > 0)
    assert np.array_equal(table, -table[::-1]) and table.mean() == 0.0
    assert abs(np.mean(table**2) - 1.0) < 1e-7 and np.abs(table).max() < 3.7
    normal = statistics.NormalDist()
    cdf = np.array([normal.cdf(x) for x in table])
    levels = np.arange(LEVELS)
    ks = max(np.abs(cdf - levels / LEVELS).max(), np.abs(cdf - (levels + 1) / LEVELS).max())
    assert ks < 2**-12


def test_generated_values_look_standard_normal_and_independent() -> None:
    n = 1 << 20
    a, b = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    fill_gaussian_(a, KEY, 0, 1)
    fill_gaussian_(b, KEY, 0, 2)
    assert abs(a.mean()) < 5 / np.sqrt(n) and abs(a.var() - 1.0) < 0.01
    assert abs(float(np.corrcoef(a, b)[0, 1])) < 5 / np.sqrt(n)  # neighbouring seeds
    assert abs(float(np.corrcoef(a[:-1], a[1:])[0, 1])) < 5 / np.sqrt(n)  # neighbouring values
    normal = statistics.NormalDist()
    sample = np.sort(a[:20_000].astype(np.float64))
    cdf = np.array([normal.cdf(x) for x in sample])
    ks = np.max(np.abs(cdf - (np.arange(sample.size) + 0.5) / sample.size))
    assert ks < 1.63 / np.sqrt(sample.size)  # Kolmogorov-Smirnov at the 1% level


@pytest.mark.parametrize("start", [0, 8, 32_760, 32_768, 65_544])
def test_pieces_equal_the_whole_stream(start: int) -> None:
    whole = np.empty(100_003, dtype=np.float32)
    fill_gaussian_(whole, KEY, 1, 5)
    piece = np.empty(whole.size - start, dtype=np.float32)
    fill_gaussian_(piece, KEY, 1, 5, start)
    assert np.array_equal(piece, whole[start:])


def test_axpy_and_sum_equal_torch_adds_bit_for_bit() -> None:
    n = 70_001
    base = torch.randn(n, generator=torch.Generator().manual_seed(0))
    zs = []
    seeds = [4, 9, 2, 11, 0, 7]  # one sweep of four seeds and a remainder of two
    for seed in seeds:
        z = np.empty(n, dtype=np.float32)
        fill_gaussian_(z, KEY, 2, seed)
        zs.append(torch.from_numpy(z))
    target = base.clone()
    add_gaussian_(target.numpy(), KEY, 2, 4, -0.731)
    assert torch.equal(target, base.clone().add_(zs[0], alpha=-0.731))

    coefs = np.array([0.3, -1.7, 2.5e-4, 1.1, -0.02, 0.6])
    acc = torch.zeros(n)
    for z, c in zip(zs, coefs, strict=True):
        acc.add_(z, alpha=float(c))
    summed = base.clone()
    add_gaussian_sum_(summed.numpy(), KEY, 2, np.array(seeds), coefs)
    assert torch.equal(summed, base + acc)


def test_bad_inputs_are_rejected_without_writing() -> None:
    target = np.zeros(16, dtype=np.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        add_gaussian_(target, KEY, 0, 0, 1.0, start=4)
    with pytest.raises(ValueError, match="float32"):
        add_gaussian_(np.zeros(16), KEY, 0, 0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bits"):
        fill_gaussian_(target, KEY, 2**32, 0)
    with pytest.raises(ValueError, match="equal-length"):
        add_gaussian_sum_(target, KEY, 0, np.array([1, 2]), np.array([1.0]))
    with pytest.raises(ValueError, match="round_keys"):
        fill_gaussian_(target, (KEY[0][:3], KEY[1]), 0, 0)
    with pytest.raises(ValueError, match="two 32-bit words"):
        round_keys((2**32, 0))
    assert not target.any()


def test_perturbation_pieces_and_validation() -> None:
    pert = Perturbation(kind="gaussian", run_seed=9, shapes=((1000,), (3, 5)))
    whole = pert.materialize(6, 0).reshape(-1)
    assert torch.equal(pert.fill_gaussian(6, 0, torch.empty(200), start=800), whole[800:])
    assert torch.equal(pert.fill_gaussian(6, 0, torch.empty(200), start=16, count=100), whole[16:116])
    with pytest.raises(ValueError, match="not inside"):
        pert.fill_gaussian(6, 0, torch.empty(200), start=904, count=200)
    with pytest.raises(ValueError, match="has 15"):
        pert.add_gaussian_(6, 1, torch.zeros(16), 1.0)
    with pytest.raises(ValueError, match="seed indices must be in"):
        pert.add_gaussian_sum_(0, np.array([-1]), np.array([1.0]), torch.zeros(1000))
    with pytest.raises(ValueError, match="needs kind='gaussian'"):
        Perturbation(kind="rademacher", run_seed=9, shapes=((4,),)).add_gaussian_(0, 0, torch.zeros(4), 1.0)
