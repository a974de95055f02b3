"""The client glue, once for every algorithm and runtime: node config -> own data -> one round.

A node loads only its own examples: a ``data-path`` (a local json/jsonl/csv/parquet task file) or,
in simulation, its ``partition-id``'s share of the configured task. Any failure becomes a typed
:class:`ClientErrorPayload`, so the server records it as a rejection and the round goes on.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.algorithms.base import ClientError, NodeContext
from fedtune.algorithms.registry import create_algorithm
from fedtune.config import DataSection, RunConfig
from fedtune.data.node import NodeData
from fedtune.runlog import MetricsLog, MetricValue, PhaseTimer
from fedtune.wire.errors import ClientErrorPayload, ErrorCode

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)
NodeConfig = Mapping[str, int | float | str | bool]
ROUNDS_FILE = "node-rounds.jsonl"
_RUN_KEY = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def client_id(node_config: NodeConfig) -> int:
    """The node's stable id: its ``partition-id`` (ClientError if absent or not an int >= 0)."""
    pid = node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ClientError(
            ErrorCode.BAD_NODE_CONFIG,
            f"node config partition-id={pid!r}: set an integer >= 0 per node "
            "(flower-supernode --node-config 'partition-id=0')",
        )
    return pid


@functools.lru_cache(maxsize=32)
def _partition(data: DataSection, num_clients: int, seed: int, pid: int, token_dir: Path | None) -> NodeData:
    def load() -> datasets.Dataset:
        from fedtune.experiment import build_federated_data_from

        parts = build_federated_data_from(data, num_clients, seed).train_partitions
        if pid >= len(parts):
            raise ClientError(
                ErrorCode.BAD_NODE_CONFIG,
                f"partition-id={pid} is outside [0, {len(parts)}) (federation.num-clients={num_clients})",
            )
        return parts[pid]

    key = None if token_dir is None else f"partition\0{data!r}\0{num_clients}\0{seed}\0{pid}"
    return NodeData(
        load, sampling=data.sampling, token_dir=token_dir, source_key=key, template=data.prompt_template
    )


@functools.lru_cache(maxsize=8)
def _local_file(path: str, seed: int, data: DataSection, token_dir: Path | None, content: str) -> NodeData:
    def load() -> datasets.Dataset:
        from fedtune.data.tasks import build_task

        return build_task(path, seed=seed)

    key = None if token_dir is None else f"file\0{path}\0{content}\0{seed}"
    return NodeData(
        load, sampling=data.sampling, token_dir=token_dir, source_key=key, template=data.prompt_template
    )


def load_node_data(cfg: RunConfig, node_config: NodeConfig, *, token_dir: Path | None = None) -> NodeData:
    """This node's examples, and nothing else; with ``token_dir``, tokenized once and kept there."""
    path = node_config.get("data-path")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise ClientError(
                ErrorCode.BAD_NODE_CONFIG, f"node config data-path={path!r} must be a path string"
            )
        file = Path(path)
        if not file.is_file():
            raise ClientError(ErrorCode.BAD_NODE_CONFIG, f"node config data-path={path!r} is not a file")
        # The content digest keys the caches: an edited file is read (and tokenized) again.
        content = hashlib.sha256(file.read_bytes()).hexdigest()
        return _local_file(str(file.resolve()), cfg.run.seed, cfg.data, token_dir, content)
    pid = client_id(node_config)
    return _partition(cfg.data, cfg.federation.num_clients, cfg.run.seed, pid, token_dir)


def state_root(node_config: NodeConfig) -> Path:
    """``state-dir`` from the node config, or the fedtune cache's ``client-state`` folder."""
    base = node_config.get("state-dir")
    if base:
        return Path(str(base))
    from fedtune.assets.models import cache_dir  # torch and transformers: only when needed

    return cache_dir() / "client-state"


def state_dir(node_config: NodeConfig, run_key: str, cid: int) -> Path:
    """``<state root>/<run key>/client-<id>``: survives processes and resumes."""
    if not _RUN_KEY.match(run_key):
        raise ClientError(ErrorCode.BAD_PAYLOAD, f"run key {run_key!r} is not a valid folder name")
    return state_root(node_config) / run_key / f"client-{cid}"


def client_round(
    cfg: RunConfig, payload: bytes, *, server_round: int, node_id: int, node_config: NodeConfig, run_key: str
) -> bytes | ClientErrorPayload:
    """Run one round of the configured algorithm on this node: its reply payload or a typed error.

    The round's phases (data load, model load, replay, local steps, ...) go to
    ``node-rounds.jsonl`` in the node's state folder.
    """
    started = process_age_s()  # before this round's work: process start plus imports, so far
    timer = PhaseTimer()
    folder: Path | None = None
    outcome = "ok"
    try:
        cid = client_id(node_config)
        folder = state_dir(node_config, run_key, cid)
        with timer.phase("data_load"):  # the rows load lazily; this is the file check and cache lookup
            data = load_node_data(
                cfg, node_config, token_dir=state_root(node_config) / "node-data" / f"client-{cid}"
            )
        node = NodeContext(node_id=node_id, partition_id=cid, data=data, state_dir=folder, timer=timer)
        client = create_algorithm(cfg).client()
        if cfg.secagg.enabled:
            from fedtune.runtime.secure_node import secure_client_round

            return secure_client_round(cfg, client, payload, node)
        return client.train(payload, node)
    except ClientError as exc:
        outcome = exc.code.name
        log.warning("round %d: %s", server_round, exc)
        return ClientErrorPayload(server_round, exc.code, str(exc), exc.held_version)
    except Exception as exc:  # any client fault ends this node's round, never the run
        outcome = ErrorCode.CLIENT_EXCEPTION.name
        log.exception("round %d: the client failed", server_round)
        return ClientErrorPayload(server_round, ErrorCode.CLIENT_EXCEPTION, f"{type(exc).__name__}: {exc}")
    finally:
        if folder is not None:
            _record_round(folder, server_round, outcome, timer, started)


def _record_round(
    folder: Path, server_round: int, outcome: str, timer: PhaseTimer, started: float | None
) -> None:
    record: dict[str, MetricValue] = {"round": server_round, "outcome": outcome, "pid": os.getpid()}
    if started is not None:
        record["process_age_at_start_s"] = round(started, 3)
    record.update(timer.as_record())
    try:
        MetricsLog(folder / ROUNDS_FILE).append(record)
    except OSError as exc:  # profiling must never fail a round
        log.warning("could not write %s: %s", folder / ROUNDS_FILE, exc)


def process_age_s() -> float | None:
    """Seconds since this process started (None where the OS does not say)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return time.time() - float(psutil.Process().create_time())
    except Exception:  # psutil comes with Ray; a node without it just lacks this column
        return None
