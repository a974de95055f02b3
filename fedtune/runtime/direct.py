"""A transport without any runtime: payloads go straight to in-process clients.

For algorithm tests and conformance checks that need no Flower at all: each "node" is a node
config, and a round calls the same client glue (:func:`fedtune.runtime.node.client_round`) that
the Flower ClientApp calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedtune.algorithms.base import NodeReply
from fedtune.config import RunConfig
from fedtune.runtime.node import NodeConfig, client_round
from fedtune.runtime.transport import Exchange, ReplyCallback, RoundRequest

ReplyHook = Callable[[NodeReply], NodeReply]


class DirectTransport:
    """Client ``i`` runs in this process with ``node_configs[i]``; ``hook`` may rewrite a reply."""

    def __init__(
        self, cfg: RunConfig, node_configs: Sequence[NodeConfig], *, hook: ReplyHook | None = None
    ) -> None:
        self.cfg = cfg
        self.nodes = {int(str(c["partition-id"])): c for c in node_configs}
        self.hook = hook

    def clients(self) -> list[int]:
        return sorted(self.nodes)

    def exchange(self, request: RoundRequest, on_reply: ReplyCallback | None = None) -> Exchange:
        out = Exchange(replies=[])
        for cid, payload in sorted(request.payloads.items()):
            result = client_round(
                self.cfg,
                payload,
                server_round=request.server_round,
                node_id=cid,
                node_config=self.nodes[cid],
                run_key=request.run_key,
            )
            reply = (
                NodeReply(cid, error=result)
                if not isinstance(result, bytes)
                else NodeReply(cid, payload=result)
            )
            if self.hook is not None:
                reply = self.hook(reply)
            out.replies.append(reply)
            if on_reply is not None:
                on_reply(reply, len(out.replies), len(request.payloads))
        return out
