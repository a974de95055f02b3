"""Reproducible client sampling that copes with nodes that are missing or still joining."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from fedtune.runtime.transport import Transport

log = logging.getLogger(__name__)
SAMPLING_TAG = 0x5A3F1E


class ClientSampler:
    """Samples ``wanted`` clients per round from a generator keyed by (run seed, round).

    With fewer live clients than wanted, the round samples all of them once the live set has not
    changed for ``settle_s`` (nodes that are still registering get that long to appear), provided
    there are at least ``minimum``; below that it waits up to ``wait_s`` and then gives up (None).
    """

    def __init__(
        self,
        *,
        run_seed: int,
        wanted: int,
        minimum: int,
        wait_s: float,
        settle_s: float = 5.0,
        poll_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.run_seed, self.wanted, self.minimum = run_seed, wanted, minimum
        self.wait_s, self.settle_s, self.poll_s = wait_s, settle_s, poll_s
        self.clock, self.sleep = clock, sleep

    def sample(self, transport: Transport, server_round: int) -> list[int] | None:
        start = self.clock()
        last: list[int] | None = None
        stable_since = start
        while True:
            live = sorted(set(transport.clients()))
            now = self.clock()
            if live != last:
                last, stable_since = live, now
            if len(live) >= self.wanted:
                return self._choose(live, self.wanted, server_round)
            if len(live) >= self.minimum and now - stable_since >= self.settle_s:
                log.warning(
                    "round %d: only %d live clients, %d wanted; sampling all of them",
                    server_round,
                    len(live),
                    self.wanted,
                )
                return self._choose(live, len(live), server_round)
            if now - start >= self.wait_s:
                log.error(
                    "round %d: %d live clients after %.0f s, at least %d needed "
                    "(federation.min-replies or the aggregator's minimum)",
                    server_round,
                    len(live),
                    self.wait_s,
                    self.minimum,
                )
                return None
            self.sleep(self.poll_s)

    def _choose(self, live: list[int], k: int, server_round: int) -> list[int]:
        rng = np.random.default_rng(np.random.SeedSequence([SAMPLING_TAG, self.run_seed, server_round]))
        return sorted(live[i] for i in rng.choice(len(live), size=k, replace=False))
