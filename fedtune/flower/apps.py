"""ServerApp and ClientApp builders; ``server/app.py`` and ``client/app.py`` only call these.

Configuration is ``RunConfig.from_flat(context.run_config ⊕ overrides)``: under ``flwr run`` the
run config holds every key (defaults from pyproject plus ``--run-config``); the programmatic
simulation passes an empty run config, so :mod:`fedtune.flower.sim` injects the whole config
as ``overrides``. Both apps serve every algorithm: they carry bytes and know none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune.algorithms.base import ClientError
from fedtune.config import RunConfig, Scalar
from fedtune.flower.records import envelope_from, reply_content
from fedtune.flower.transport import INFO_RECORD, GridTransport
from fedtune.runtime.node import client_id, client_round
from fedtune.wire.errors import ClientErrorPayload, ErrorCode

log = logging.getLogger(__name__)
Overrides = Mapping[str, Scalar]


def config_from(run_config: Mapping[str, Any], overrides: Overrides | None) -> RunConfig:
    return RunConfig.from_flat({**dict(run_config), **dict(overrides or {})})


def build_server_app(
    overrides: Overrides | None = None,
    *,
    results: list[dict[str, Any]] | None = None,
    resume_dir: Path | None = None,
) -> ServerApp:
    """A ServerApp that runs (or, with ``resume_dir``, resumes) the configured algorithm."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedtune.runtime.loop import RunLoop  # server-only: a ClientApp process never pays for it

        cfg = config_from(context.run_config, overrides)
        loop = RunLoop(cfg, GridTransport(grid), run_dir=resume_dir, resume=resume_dir is not None)
        summary = loop.run()
        if results is not None:
            results.append(summary)

    return app


def build_client_app(overrides: Overrides | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            envelope = envelope_from(msg)
        except ValueError as exc:
            return Message(
                reply_content(ClientErrorPayload(0, ErrorCode.BAD_PAYLOAD, str(exc))), reply_to=msg
            )
        try:
            cfg = config_from(context.run_config, overrides)
        except ValueError as exc:
            error = ClientErrorPayload(envelope.server_round, ErrorCode.BAD_NODE_CONFIG, f"run config: {exc}")
            return Message(reply_content(error), reply_to=msg)
        result = client_round(
            cfg,
            envelope.payload,
            server_round=envelope.server_round,
            node_id=int(context.node_id),
            node_config=dict(context.node_config),
            run_key=envelope.run_key,
        )
        return Message(reply_content(result), reply_to=msg)

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        """Who this node is: its stable client id (the server samples by it, reproducibly)."""
        try:
            cid = client_id(dict(context.node_config))
        except ClientError as exc:
            log.error("%s", exc)
            cid = -1
        return Message(RecordDict({INFO_RECORD: ConfigRecord({"client-id": cid})}), reply_to=msg)

    return app
