"""The client side of a secure-aggregation round: one stage per message, its state on disk between.

A deployed node runs a fresh process per message, so the protocol state (this round's private
keys, self-mask seed and received shares) is written to the node's private folder with mode 0600
after each stage, atomically, and deleted after the last one. At the masking stage the
algorithm trains as usual (:meth:`ClientAlgorithm.train_summand`) and only its masked vector and
public remainder leave the node.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fedtune.algorithms.base import ClientAlgorithm, ClientError, NodeContext
from fedtune.config import RunConfig
from fedtune.runtime.secure import weighted_vector
from fedtune.secagg import (
    SecAggClient,
    SecAggError,
    SecAggPayloadError,
    Stage,
    decode_envelope,
    encode_envelope,
)
from fedtune.secagg.messages import KeysBroadcast, MaskRequest, Message, SetupRequest, UnmaskRequest
from fedtune.wire.errors import ErrorCode

STATE_FILE = "secagg-client.bin"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def _load(path: Path, stage: Stage) -> SecAggClient:
    if not path.is_file():
        raise ClientError(
            ErrorCode.BAD_PAYLOAD,
            f"secure-aggregation stage {stage.name} arrived but this node holds no state for the round "
            "(it missed an earlier stage or its state folder was wiped); it sits this round out",
        )
    try:
        return SecAggClient.from_bytes(path.read_bytes())
    except (SecAggPayloadError, SecAggError, ValueError) as exc:
        raise ClientError(ErrorCode.BAD_PAYLOAD, f"secure-aggregation state is unreadable: {exc}") from exc


def weight_of(cfg: RunConfig, num_examples: float) -> float:
    """A summand's weight under the configured weighted mean: its example count, or 1 (``equal``)."""
    equal = dict(cfg.aggregator.options).get("weighting") == "equal"
    return 1.0 if equal else float(num_examples)


def secure_client_round(cfg: RunConfig, client: ClientAlgorithm, payload: bytes, node: NodeContext) -> bytes:
    """Answer one stage of a secure round (raises :class:`ClientError` for a refused stage)."""
    try:
        stage, body, inner = decode_envelope(payload, expect_reply=False)
    except SecAggPayloadError as exc:
        raise ClientError(ErrorCode.BAD_PAYLOAD, f"malformed secure-aggregation message: {exc}") from exc
    path = node.state_dir / STATE_FILE
    secagg = SecAggClient() if isinstance(body, SetupRequest) else _load(path, stage)
    out_inner = b""
    try:
        reply: Message
        if isinstance(body, SetupRequest):
            reply = secagg.handle_setup(body, node.partition_id)
        elif isinstance(body, KeysBroadcast):
            reply = secagg.handle_keys(body)
        elif isinstance(body, MaskRequest):
            # the algorithm's own round: its failures keep their own error codes
            summand = client.train_summand(inner, node)
            weight = weight_of(cfg, summand.weight)
            vector = weighted_vector(summand.vector, weight, max_weight=cfg.secagg.max_weight)
            reply = secagg.handle_mask(body, vector)
            out_inner = summand.public
        elif isinstance(body, UnmaskRequest):
            reply = secagg.handle_unmask(body)
        else:
            raise ClientError(ErrorCode.BAD_PAYLOAD, f"a client does not answer stage {stage.name}")
    except SecAggError as exc:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise ClientError(ErrorCode.BAD_PAYLOAD, f"secure aggregation refused: {exc}") from exc
    if isinstance(body, UnmaskRequest):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # the round's private keys are no longer needed
    else:
        _write_private(path, secagg.to_bytes())
    return encode_envelope(stage, reply, out_inner)
