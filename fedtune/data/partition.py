"""Split a task across federated clients: IID, label-skewed (Dirichlet) or by natural group.

Backed by ``flwr_datasets`` partitioners, which depend on ``datasets`` but not on ``flwr``
itself, so this module stays usable outside a Flower run.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from fedtune.data.sources import quiet_datasets

if TYPE_CHECKING:  # flwr_datasets pulls in seaborn and matplotlib (~1 s): imported where it partitions
    import datasets
    from flwr_datasets.partitioner import Partitioner

__all__ = ["PARTITION_SCHEMES", "partition_dataset"]

PARTITION_SCHEMES = ("iid", "dirichlet", "group")
# Purpose tags mixed into the seed so partitioning never shares a stream with other seeded uses.
_IID_TAG, _DIRICHLET_TAG, _GROUP_TAG = 0x49494400, 0x44495200, 0x47525000


def _derived_seed(seed: int, tag: int) -> int:
    return int(np.random.SeedSequence([seed, tag]).generate_state(1, dtype=np.uint32)[0])


def _load_all(partitioner: Partitioner, ds: datasets.Dataset, num_partitions: int) -> list[datasets.Dataset]:
    partitioner.dataset = ds
    return [partitioner.load_partition(i) for i in range(num_partitions)]


def _group_partitions(ds: datasets.Dataset, num_partitions: int, seed: int) -> list[datasets.Dataset]:
    """Assign whole groups to partitions, largest first onto the currently smallest partition.

    flwr-datasets' GroupedNaturalIdPartitioner fixes the number of ids per partition rather than
    the number of partitions, is unseeded and ignores group sizes, so a seeded greedy balance is
    used instead: every group lands in exactly one partition and sizes stay close.
    """
    groups = ds["group"]
    names, inverse, counts = np.unique(
        np.asarray(groups, dtype=object), return_inverse=True, return_counts=True
    )
    if len(names) < num_partitions:
        raise ValueError(
            f"scheme 'group' needs at least num_partitions={num_partitions} distinct values in the 'group' "
            f"column, found {len(names)}; lower num_partitions or use scheme 'iid' or 'dirichlet'"
        )
    rng = np.random.default_rng(_derived_seed(seed, _GROUP_TAG))
    order = rng.permutation(len(names))  # random tie-break among equal-sized groups
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(num_partitions, dtype=np.int64)
    owner = np.empty(len(names), dtype=np.int64)
    for g in order:
        p = int(np.argmin(sizes))
        owner[g] = p
        sizes[p] += counts[g]
    row_owner = owner[inverse]
    return [ds.select(np.flatnonzero(row_owner == p)) for p in range(num_partitions)]


def partition_dataset(
    ds: datasets.Dataset,
    *,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    min_partition_size: int = 1,
) -> list[datasets.Dataset]:
    """Split ``ds`` into ``num_partitions`` non-empty client datasets, deterministically in ``seed``.

    Parameters
    ----------
    scheme
        ``"iid"``: uniform shuffle then equal shards. ``"dirichlet"``: per-label proportions drawn
        from Dir(``alpha``) over the ``label`` column (smaller alpha = more label skew).
        ``"group"``: whole values of the ``group`` column (movie, category) per client.
    min_partition_size
        Dirichlet resamples (up to 10 times) until every client has at least this many rows.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"Unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}")
    if isinstance(num_partitions, bool) or not 1 <= num_partitions <= len(ds):
        raise ValueError(f"num_partitions must be in [1, {len(ds)}] (the dataset size); got {num_partitions}")
    if min_partition_size < 1:
        raise ValueError(f"min_partition_size must be >= 1; got {min_partition_size}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (smaller = more label skew); got {alpha}")
    needed = {"dirichlet": "label", "group": "group"}.get(scheme)
    if needed is not None and needed not in ds.column_names:
        raise ValueError(f"scheme {scheme!r} needs a {needed!r} column; the dataset has {ds.column_names}")
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    with quiet_datasets():
        if scheme == "iid":
            shuffled = ds.shuffle(seed=_derived_seed(seed, _IID_TAG)).flatten_indices()
            parts = _load_all(IidPartitioner(num_partitions=num_partitions), shuffled, num_partitions)
        elif scheme == "dirichlet":
            partitioner = DirichletPartitioner(
                num_partitions=num_partitions,
                partition_by="label",
                alpha=float(alpha),
                min_partition_size=min_partition_size,
                shuffle=True,
                seed=_derived_seed(seed, _DIRICHLET_TAG),
            )
            try:
                with warnings.catch_warnings():  # it warns on every resampling attempt
                    warnings.simplefilter("ignore", UserWarning)
                    parts = _load_all(partitioner, ds, num_partitions)
            except ValueError as err:
                raise ValueError(
                    f"Dirichlet partitioning of {len(ds)} rows into {num_partitions} partitions with "
                    f"alpha={alpha} could not give every partition >= {min_partition_size} rows ({err}); "
                    "lower num_partitions, raise alpha or lower min_partition_size"
                ) from err
        else:
            parts = _group_partitions(ds, num_partitions, seed)

    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(
            f"Partitions {empty} are empty ({scheme=}, {num_partitions=}, {alpha=}); lower num_partitions"
            + (" or raise alpha" if scheme == "dirichlet" else "")
        )
    return parts
