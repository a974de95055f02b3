"""UpdateBatch checks and canonical order, and the base records' validation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fedtune.aggregators import Aggregator, ClientUpdate, GlobalUpdate, UpdateBatch


def _upd(node_id: int, **arrays: list[float]) -> ClientUpdate:
    return ClientUpdate(
        node_id=node_id,
        num_examples=node_id + 1,
        arrays={k: np.array(v, np.float32) for k, v in arrays.items()},
    )


def test_batch_sorts_by_node_id_and_keeps_array_order() -> None:
    batch = UpdateBatch(
        [_upd(7, b=[1.0], a=[2.0, 0.0]), _upd(3, b=[3.0], a=[0.0, 4.0])], aggregator="t", server_round=1
    )
    assert batch.node_ids == (3, 7)
    assert batch.names == ("b", "a")  # the lowest node's order
    assert batch.stack("a").dtype == np.float64
    np.testing.assert_array_equal(batch.stack("a"), [[0.0, 4.0], [2.0, 0.0]])
    np.testing.assert_array_equal(batch.weights(), [4.0, 8.0])
    np.testing.assert_allclose(batch.norms(), [5.0, np.sqrt(5.0)])  # over both arrays


def test_batch_error_messages() -> None:
    with pytest.raises(ValueError, match=r"median \(round 4\): no updates"):
        UpdateBatch([], aggregator="median", server_round=4)
    with pytest.raises(ValueError, match="node 5 sent two updates"):
        UpdateBatch([_upd(5, a=[1.0]), _upd(5, a=[2.0])], aggregator="t", server_round=1)
    with pytest.raises(
        ValueError, match=r"node 9 has different arrays than node 2 \(missing \['b'\], extra \[\]\)"
    ):
        UpdateBatch([_upd(9, a=[1.0]), _upd(2, a=[1.0], b=[1.0])], aggregator="t", server_round=1)
    with pytest.raises(ValueError, match=r"array 'a' from node 9 has shape \(2,\), but node 2 sent \(1,\)"):
        UpdateBatch([_upd(9, a=[1.0, 2.0]), _upd(2, a=[1.0])], aggregator="t", server_round=1)


def test_to_global_casts_and_rejects_overflow_and_wrong_names() -> None:
    batch = UpdateBatch([_upd(1, a=[1.0])], aggregator="t", server_round=1)
    out = batch.to_global({"a": np.array([1.0 / 3.0])})
    assert out.arrays["a"].dtype == np.float32
    assert not out.arrays["a"].flags.writeable
    with pytest.raises(ValueError, match="differ from the client arrays"):
        batch.to_global({"z": np.array([1.0])})
    with pytest.raises(ValueError, match="NaN or Inf"), np.errstate(over="ignore"):
        batch.to_global({"a": np.array([1e300])})


def test_records_validate_their_input() -> None:
    with pytest.raises(ValueError, match="convert it to float32"):
        ClientUpdate(node_id=1, num_examples=1, arrays={"a": np.zeros(2, np.float64)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        ClientUpdate(node_id=1, num_examples=1, arrays={"a": np.array([np.nan], np.float32)})
    with pytest.raises(ValueError, match="num_examples must be positive"):
        ClientUpdate(node_id=1, num_examples=0, arrays={"a": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="num_clients must be positive"):
        GlobalUpdate(arrays={"a": np.zeros(2, np.float32)}, num_clients=0)


def test_base_defaults_are_conservative() -> None:
    class Plain(Aggregator):
        def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
            raise NotImplementedError

    agg = Plain()
    assert (agg.name, agg.permutation_invariant, agg.min_clients, agg.state_dict()) == ("", False, 1, {})
    agg.load_state_dict({})
    with pytest.raises(ValueError, match="stateless but got state keys"):
        agg.load_state_dict({"x": 1})
