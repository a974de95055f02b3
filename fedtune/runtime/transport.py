"""What the run loop needs from a runtime: the live clients and one payload exchange per round.

The Flower adapter implements it over any Flower ``Grid`` (the in-process test grid, Ray
simulation, a real deployment), so the loop itself never sees Flower. Clients are named by their
stable ids (the ``partition-id`` of their node config), never by a runtime's per-run node ids,
so checkpoints and per-client state mean the same thing after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fedtune.algorithms.base import NodeReply

ReplyCallback = Callable[[NodeReply, int, int], None]  # (reply, replies so far, expected)


@dataclass(frozen=True)
class RoundRequest:
    """One round's delivery: a payload per client id, the run key, and how long to wait."""

    server_round: int
    payloads: Mapping[int, bytes]
    run_key: str
    timeout: float


@dataclass
class Exchange:
    """One round's replies (one per addressed client; a missing one is an error reply) and bytes."""

    replies: list[NodeReply]
    message_bytes_down: list[int] = field(default_factory=list)
    message_bytes_up: list[int] = field(default_factory=list)


class Transport(Protocol):
    """A runtime as the run loop sees it."""

    def clients(self) -> list[int]:
        """Stable ids of the clients that are connected now."""
        ...

    def exchange(self, request: RoundRequest, on_reply: ReplyCallback | None = None) -> Exchange:
        """Deliver each payload to its client and collect the replies (at most ``timeout`` s)."""
        ...
