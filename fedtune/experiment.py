"""Everything a run derives from its config, built the same way by the server and every client.

Server and clients each rebuild the task, the held-out split and the partitions from the run
config alone (deterministic in ``run.seed``), so no data ever crosses the wire.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from datasets import Dataset

from fedtune.config import DataSection, RunConfig
from fedtune.data.partition import partition_dataset
from fedtune.data.tasks import build_task, split_groups, split_heldout


@dataclass(frozen=True)
class FederatedData:
    """train_partitions[i] is client i's private data; heldout and zeroshot stay on the server.

    zeroshot: rows of ``data.heldout-groups`` (None when none are held out), groups no partition holds.
    """

    train_partitions: tuple[Dataset, ...]
    heldout: Dataset
    zeroshot: Dataset | None = None


def build_federated_data(cfg: RunConfig) -> FederatedData:
    """Task -> zero-shot groups out -> held-out split -> capped training pool -> one partition per client."""
    return build_federated_data_from(cfg.data, cfg.federation.num_clients, cfg.run.seed)


@functools.lru_cache(maxsize=4)
def build_federated_data_from(data_cfg: DataSection, num_clients: int, seed: int) -> FederatedData:
    """:func:`build_federated_data` from its three inputs (cached: clients of a process share it)."""
    task = build_task(data_cfg.task, seed=seed)
    zeroshot: Dataset | None = None
    if data_cfg.heldout_group_names:
        groups = split_groups(task, data_cfg.heldout_group_names)
        task = groups.train
        # The zero-shot split is cut like the held-out one: its loss and generations are paid each round.
        zeroshot = groups.heldout.select(range(min(data_cfg.heldout_size, len(groups.heldout))))
    if data_cfg.heldout_size >= len(task):
        raise ValueError(
            f"data.heldout_size={data_cfg.heldout_size} leaves no training data "
            f"from {len(task)} examples{' outside data.heldout-groups' if zeroshot is not None else ''}; "
            "lower it"
        )
    split = split_heldout(task, heldout_size=data_cfg.heldout_size, seed=seed)
    train = split.train
    if data_cfg.max_train_examples and len(train) > data_cfg.max_train_examples:
        train = train.select(range(data_cfg.max_train_examples))
    scheme = data_cfg.partition
    parts = partition_dataset(
        train, num_partitions=num_clients, scheme=scheme, seed=seed, alpha=data_cfg.alpha
    )
    return FederatedData(train_partitions=tuple(parts), heldout=split.heldout, zeroshot=zeroshot)
