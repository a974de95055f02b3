"""Bytes on the wire per client per round, measured by serializing real messages.

A tiny model runs real FedKSeed client rounds (tau two-point steps each) against the real server,
so every payload below is what ``fedtune/wire`` encodes and what Flower carries: nothing is
computed from a formula. K=4096, tau=200, fp32 scalars by default (the paper's setting).

``*_compact`` keys: float16 scalars and, for a client that synced in the previous round, the
sparse accumulator delta instead of the dense K floats.

Usage: python benchmarks/comm.py [--quick]   (last line: one JSON object)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from fedtune.aggregators import create_aggregator
from fedtune.algorithms.base import NodeReply
from fedtune.assets.models import tiny_causal_lm
from fedtune.data.batch import TokenBatch
from fedtune.fedkseed.client import FedKSeedClient
from fedtune.fedkseed.replica import fingerprint_digest
from fedtune.fedkseed.server import FedKSeedServer, RoundSettings
from fedtune.flower.records import Envelope, message_nbytes, reply_content, train_content
from fedtune.wire.codec import ReplyPayload, SparseDelta, encode_reply, encode_sync
from fedtune.zo import Fingerprint, MeZOStep, ParamSelection, ZOConfig, select_parameters


def flower_message_sizes(down: bytes, up: bytes) -> tuple[int, int]:
    """Serialize both payloads inside real Flower messages (train message and its reply)."""
    import uuid

    from flwr.app import Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    content = train_content(Envelope(server_round=1, run_key=uuid.uuid4().hex, payload=down))
    msg = Message(content, 1234, MessageType.TRAIN, group_id="1")
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # set by Flower's runtime in real runs
    reply = Message(reply_content(up), reply_to=msg)
    return message_nbytes(msg), message_nbytes(reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer clients per round (same K and tau)")
    args = parser.parse_args()
    k, tau = 4096, 200
    clients_per_round = 2 if args.quick else 3
    t0 = time.perf_counter()

    # Payload sizes do not depend on the model, only on K and tau: a 256-token tiny model keeps
    # the 200 real two-point steps per client fast.
    model = tiny_causal_lm(vocab_size=256, seed=0, hidden_size=16, num_layers=1)
    tuned = select_parameters(model, ParamSelection())
    stepper = MeZOStep(model, tuned, ZOConfig(eps=1e-3, kind="rademacher"), run_seed=42)
    fp = fingerprint_digest(Fingerprint.of(tuned, kind="rademacher", run_seed=42))
    client = FedKSeedClient(stepper, num_seeds=k, run_seed=42, fingerprint=fp)
    ids = torch.arange(32).reshape(2, 16) % 256
    labels = ids.clone()
    labels[:, :12] = -100  # the "answer" is the last 4 tokens
    batch = TokenBatch(ids, torch.ones_like(ids), labels)

    def settings(rnd: int) -> RoundSettings:
        return RoundSettings(server_round=rnd, lr=1e-6, eps=1e-3, num_local_steps=tau, batch_size=2)

    server = FedKSeedServer(
        num_seeds=k,
        aggregator=create_aggregator("weighted-mean"),
        fingerprint=fp,
        settings=settings,
        sparse_sync=True,
    )

    def client_round(node: int) -> ReplyPayload:
        sync = server.make_sync(node, settings(1))
        reply, _ = client.train_round(
            sync, client_key=node, view=None, batch_for_step=lambda _t: batch, num_examples=100
        )
        return reply

    nodes = list(range(1, clients_per_round + 1))
    server.configure(1, nodes)
    replies = [client_round(n) for n in nodes]
    server.aggregate(
        1, [NodeReply(n, payload=encode_reply(r)) for n, r in zip(nodes, replies, strict=True)], min_replies=1
    )
    reply = replies[0]
    up = encode_reply(reply)
    up_compact = encode_reply(reply, scalar_dtype="float16")
    # Round 2: node 1's round-1 reply was accepted, so the compact download is the sparse delta since then;
    # the reference download is the same sync carrying the dense accumulator (K float32).
    sync2 = server.make_sync(1, settings(2))
    if not isinstance(sync2.accumulator, SparseDelta):
        raise RuntimeError("expected a sparse delta for a node that synced last round")
    down_compact = encode_sync(sync2)
    down = encode_sync(dataclasses.replace(sync2, accumulator=server.accumulator.astype(np.float32)))
    msg_down, msg_up = flower_message_sizes(down, up)
    msg_down_c, msg_up_c = flower_message_sizes(down_compact, up_compact)

    result = {
        "num_seeds": k,
        "local_steps": tau,
        "clients_per_round": clients_per_round,
        "payload_bytes_up": len(up),
        "payload_bytes_down": len(down),
        "payload_bytes_total": len(up) + len(down),
        "fits_18432": len(up) + len(down) <= 18432,
        "message_bytes_up": msg_up,
        "message_bytes_down": msg_down,
        "payload_bytes_up_compact": len(up_compact),
        "payload_bytes_down_compact": len(down_compact),
        "payload_bytes_total_compact": len(up_compact) + len(down_compact),
        "message_bytes_up_compact": msg_up_c,
        "message_bytes_down_compact": msg_down_c,
        "steps_taken": int(reply.seed_indices.size),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
