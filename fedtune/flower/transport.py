"""The run loop's :class:`~fedtune.runtime.transport.Transport` over any Flower ``Grid``.

fedtune drives the Grid itself instead of subclassing ``Strategy``: ``Strategy.start`` always
runs rounds 1..N with its own evaluation hook, so it can neither resume at round k nor stop a
run early. This class is the only Flower-facing piece of a round, and it knows no algorithm.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune.algorithms.base import NodeReply
from fedtune.flower.records import Envelope, message_nbytes, reply_from, train_content
from fedtune.runtime.transport import Exchange, ReplyCallback, RoundRequest
from fedtune.wire.errors import ClientErrorPayload, ErrorCode

log = logging.getLogger(__name__)
INFO_RECORD = "info"
INFO_QUERY = f"{MessageType.QUERY}.info"


TTL_MARGIN_S = 60.0


class GridTransport:
    """Maps Flower node ids to stable client ids (``query.info``) and exchanges one payload each."""

    def __init__(self, grid: Grid, *, query_timeout: float = 120.0, poll_s: float = 0.05) -> None:
        self.grid = grid
        self.query_timeout = query_timeout
        self.poll_s = poll_s
        self.client_of: dict[int, int] = {}  # Flower node id -> client id
        self._asked: set[int] = set()

    def _discover(self, nodes: list[int], live: set[int]) -> None:
        queries = [Message(RecordDict({INFO_RECORD: ConfigRecord({})}), n, INFO_QUERY) for n in nodes]
        for reply in self.grid.send_and_receive(queries, timeout=self.query_timeout):
            node = int(reply.metadata.src_node_id)
            # Only an answer settles a node: one still starting (a slow first import) is asked again.
            self._asked.add(node)
            record = None if reply.has_error() else reply.content.config_records.get(INFO_RECORD)
            cid = None if record is None else record.get("client-id")
            if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
                reason = reply.error.reason if reply.has_error() else f"client-id {cid!r}"
                log.warning(
                    "node %d cannot be sampled (query.info: %s); check its partition-id", node, reason
                )
                continue
            owners = [n for n, c in self.client_of.items() if c == cid]
            if any(n in live for n in owners):
                log.warning(
                    "node %d claims client id %d, already live node %d's; it will not be sampled",
                    node,
                    cid,
                    owners[0],
                )
                continue
            for gone in owners:  # the same client came back under a new node id (a restarted SuperNode)
                del self.client_of[gone]
            self.client_of[node] = cid

    def clients(self) -> list[int]:
        nodes = sorted(int(n) for n in self.grid.get_node_ids())
        new = [n for n in nodes if n not in self._asked]
        if new:
            self._discover(new, set(nodes))
        return sorted(self.client_of[n] for n in nodes if n in self.client_of)

    def exchange(self, request: RoundRequest, on_reply: ReplyCallback | None = None) -> Exchange:
        server_round, timeout = request.server_round, request.timeout
        node_of = {c: n for n, c in self.client_of.items()}
        messages: list[Message] = []
        gone: list[NodeReply] = []
        for cid, payload in request.payloads.items():
            if cid not in node_of:
                error = ClientErrorPayload(
                    server_round, ErrorCode.CLIENT_EXCEPTION, "client is not connected"
                )
                gone.append(NodeReply(cid, error=error))
                continue
            content = train_content(Envelope(server_round, request.run_key, payload))
            # The TTL lets the SuperLink drop a message nobody fetched in time, so a node that
            # comes back long after the round is not handed its work. A reply expires with its
            # message, so the TTL also covers the push itself, which can take seconds under load.
            ttl = timeout + TTL_MARGIN_S
            messages.append(
                Message(content, node_of[cid], MessageType.TRAIN, ttl=ttl, group_id=str(server_round))
            )
        out = Exchange(replies=gone, message_bytes_down=[message_nbytes(m) for m in messages[:1]])
        ids = list(self.grid.push_messages(messages))
        pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
        deadline = time.monotonic() + timeout
        total = len(request.payloads)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                node = pending.pop(mid, None)
                if node is None:
                    continue
                cid = self.client_of[node]
                if not out.message_bytes_up and not reply.has_error():
                    out.message_bytes_up.append(message_nbytes(reply))
                parsed = reply_from(reply, cid, server_round)
                out.replies.append(parsed)
                if on_reply is not None:
                    on_reply(parsed, len(out.replies), total)
            if pending:
                time.sleep(self.poll_s)
        for node in pending.values():
            err = ClientErrorPayload(
                server_round, ErrorCode.CLIENT_EXCEPTION, f"no reply within {timeout:.0f} s"
            )
            out.replies.append(NodeReply(self.client_of[node], error=err))
        return out
