"""The compiled CPU kernels for Rademacher directions match the torch kernels bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.zo.perturbation import Perturbation, expand_signs
from fedtune.zo.sign_jit import _byte_transpose, add_sign_group_, sign_axpy_
from fedtune.zo.sign_sums import SignSumWorkspace, group_table

CPU = torch.device("cpu")
SIZES = (1, 7, 8, 9, 63, 64, 65, 1_000, 4_099)


def test_byte_transpose_swaps_word_and_byte() -> None:
    words = np.random.Generator(np.random.PCG64(2)).integers(0, 2**63, 8, dtype=np.uint64)
    words[3] |= np.uint64(1 << 63)  # a top bit set: shifts must stay unsigned
    out = _byte_transpose(*words)
    for b in range(8):
        for k in range(8):
            assert (int(out[b]) >> (8 * k)) & 0xFF == (int(words[k]) >> (8 * b)) & 0xFF


def test_sign_words_are_the_packed_signs() -> None:
    perturbation = Perturbation("rademacher", 11, ((3, 70), (5,)))
    for position, n in enumerate(perturbation.numels):
        words = perturbation.sign_words(4, position)
        assert words.dtype == np.uint64 and words.size == (n + 63) // 64
        bits = [(int(words[i // 64]) >> (i % 64)) & 1 for i in range(n)]
        signs = expand_signs(perturbation.packed_signs(4, position), n)
        assert signs.tolist() == [1.0 if bit else -1.0 for bit in bits]
    with pytest.raises(ValueError, match="kind='rademacher'"):
        Perturbation("gaussian", 11, ((3,),)).sign_words(0, 0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("count", [1, 5, 8, 9, 16])
def test_group_sum_is_bit_identical_to_torch(n: int, count: int) -> None:
    perturbation = Perturbation("rademacher", 3, ((n,),))
    table = group_table(list(np.random.Generator(np.random.PCG64(n * count)).normal(size=count)))
    expected = torch.full((n,), 0.25)
    packed = [perturbation.packed_signs(s, 0) for s in range(count)]
    SignSumWorkspace(CPU, 256).add_group_(expected, packed, table)
    acc = torch.full((n,), 0.25)
    add_sign_group_(acc.numpy(), [perturbation.sign_words(s, 0) for s in range(count)], table.numpy())
    assert torch.equal(acc, expected)


@pytest.mark.parametrize("n", SIZES)
def test_axpy_is_bit_identical_to_add(n: int) -> None:
    perturbation = Perturbation("rademacher", 5, ((n,),))
    start = torch.randn(n, generator=torch.Generator().manual_seed(n))
    expected = start.clone().add_(expand_signs(perturbation.packed_signs(1, 0), n), alpha=-0.3)
    target = start.clone()
    sign_axpy_(target.numpy(), perturbation.packed_signs(1, 0).numpy(), -0.3)
    assert torch.equal(target, expected)


def test_kernel_errors() -> None:
    perturbation = Perturbation("rademacher", 3, ((100,),))
    words = [perturbation.sign_words(s, 0) for s in range(9)]
    acc = np.zeros(100, dtype=np.float32)
    with pytest.raises(ValueError, match="exactly the seeds"):
        add_sign_group_(acc, words, group_table([1.0] * 8).numpy())
    with pytest.raises(ValueError, match="exactly the seeds"):
        add_sign_group_(acc, words[:8], group_table([1.0] * 9).numpy())
    with pytest.raises(ValueError, match=">= 2 words"):
        add_sign_group_(acc, [words[0][:1]], group_table([1.0]).numpy())
    with pytest.raises(ValueError, match="float32"):
        add_sign_group_(acc.astype(np.float64), words[:1], group_table([1.0]).numpy())
    with pytest.raises(ValueError, match="group_table"):
        add_sign_group_(acc, words[:1], np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="bytes"):
        sign_axpy_(acc, np.zeros(12, dtype=np.uint8), 1.0)
    with pytest.raises(ValueError, match="writable"):
        sign_axpy_(acc.astype(np.float64), np.zeros(13, dtype=np.uint8), 1.0)
    assert not acc.any()  # rejected calls write nothing
