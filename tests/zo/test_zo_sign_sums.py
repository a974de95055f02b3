"""Sixteen Rademacher seeds per table lookup: the bit transpose, the tables and the sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.zo.perturbation import Perturbation
from fedtune.zo.sign_sums import GROUP, SignSumWorkspace, group_table, transpose_bits

CPU = torch.device("cpu")


def test_transpose_moves_bit_8r_plus_c_to_8c_plus_r() -> None:
    words = np.random.Generator(np.random.PCG64(5)).integers(-(2**63), 2**63 - 1, 64, dtype=np.int64)
    out = transpose_bits(torch.from_numpy(words.copy())).numpy()
    for before, after in zip(words.view(np.uint64), out.view(np.uint64), strict=True):
        for r in range(8):
            for c in range(8):
                assert (int(before) >> (8 * r + c)) & 1 == (int(after) >> (8 * c + r)) & 1


@pytest.mark.parametrize("count", [1, 3, 8, 9, 16])
def test_table_entries_are_signed_sums(count: int) -> None:
    values = np.random.Generator(np.random.PCG64(count)).normal(size=count)
    table = group_table(list(values)).double().numpy()
    assert table.size == (256 if count <= 8 else 65_536)
    for entry in (0, 1, 255, 256 if count > 8 else 128, table.size - 1, 12_345 % table.size):
        signs = np.array([1.0 if (entry >> k) & 1 else -1.0 for k in range(count)])
        assert table[entry] == pytest.approx(float(signs @ values), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1_000, 4_099])
@pytest.mark.parametrize("count", [1, 5, 8, 9, 16])
def test_group_sum_equals_seed_by_seed(n: int, count: int) -> None:
    perturbation = Perturbation("rademacher", 3, ((n,),))
    values = list(np.random.Generator(np.random.PCG64(n + count)).normal(size=count))
    acc = torch.full((n,), 0.5)
    workspace = SignSumWorkspace(CPU, 256)  # several chunks for the larger n
    workspace.add_group_(acc, [perturbation.packed_signs(s, 0) for s in range(count)], group_table(values))
    expected = torch.full((n,), 0.5, dtype=torch.float64)
    for seed, value in enumerate(values):
        expected += value * perturbation.materialize(seed, 0).double()
    torch.testing.assert_close(acc.double(), expected, rtol=1e-6, atol=1e-6)


def test_group_errors() -> None:
    perturbation = Perturbation("rademacher", 3, ((100,),))
    packed = [perturbation.packed_signs(s, 0) for s in range(9)]
    workspace = SignSumWorkspace(CPU, 64)
    with pytest.raises(ValueError, match="1 to 16"):
        group_table([1.0] * (GROUP + 1))
    with pytest.raises(ValueError, match="exactly the seeds"):
        workspace.add_group_(torch.zeros(100), packed, group_table([1.0] * 8))
    with pytest.raises(ValueError, match="exactly the seeds"):
        workspace.add_group_(torch.zeros(100), packed[:8], group_table([1.0] * 9))
    with pytest.raises(ValueError, match="needs 13 bytes"):
        workspace.add_group_(torch.zeros(100), [packed[0][:5]], group_table([1.0]))
    with pytest.raises(ValueError, match="multiple of 64"):
        SignSumWorkspace(CPU, 100)
