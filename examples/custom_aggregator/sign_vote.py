"""A user's own aggregator, kept outside the fedtune package.

Select it in a run config with::

    [aggregator]
    name = "examples.custom_aggregator.sign_vote:SignVote"

fedtune imports ``examples.custom_aggregator.sign_vote`` from the working directory (the repo
root) or ``PYTHONPATH``. ``SignVote`` takes no options, so an ``[aggregator.options]`` table is
an error; an aggregator with a keyword parameter (``def __init__(self, *, max_iter: int = 10)``)
receives ``max-iter`` from that table, checked against the annotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from fedtune.aggregators import Aggregator, ClientUpdate, GlobalUpdate, UpdateBatch


class SignVote(Aggregator):
    """Per coordinate: the sign most clients agree on, times the clients' median magnitude.

    The majority vote of signSGD: Bernstein et al., "signSGD with Majority Vote is Communication
    Efficient and Fault Tolerant", ICLR 2019, https://arxiv.org/abs/1810.05291. A minority cannot
    flip a sign; a tied vote gives 0. Scaling by the median ``|x|`` (our addition) keeps FedKSeed
    coefficients on their natural scale, so a lone client's update comes back unchanged.
    """

    name: ClassVar[str] = "sign-vote"
    permutation_invariant: ClassVar[bool] = True

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> GlobalUpdate:
        """Return ``sign(sum_i sign(x_i)) * median_i |x_i|`` for every array."""
        # UpdateBatch rejects empty rounds and mismatched arrays, and sorts by node_id.
        batch = UpdateBatch(updates, aggregator=self.name, server_round=server_round)
        out = {}
        for name in batch.names:
            stacked = batch.stack(name)  # float64, shape (num_clients, *array_shape)
            vote = np.sign(np.sign(stacked).sum(axis=0))
            out[name] = vote * np.median(np.abs(stacked), axis=0)
        return batch.to_global(out)
