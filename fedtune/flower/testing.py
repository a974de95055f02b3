"""An in-process Grid: runs a ClientApp synchronously for fake nodes, with no Ray and no network.

For fast, deterministic strategy tests (see ../shared docs, Flower 1.42 §1.2). The real runtimes
(Ray simulation, deployment) are covered by slower integration tests.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedtune.config import RunConfig
from fedtune.flower.apps import build_client_app
from fedtune.flower.transport import GridTransport
from fedtune.runlog import MetricValue
from fedtune.runtime.loop import RunLoop

ConfigValue = int | float | str | bool


def wire_round_trip(message: Message) -> Message:
    """Serialize a message into Flower's wire objects and back, as a real runtime would."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    restored = inflate_object_from_contents(message.object_id, contents)
    if not isinstance(restored, Message):
        raise TypeError(f"inflated a {type(restored).__name__}, expected a Message")
    return restored


class LocalGrid(Grid):
    """Delivers each message to ``client_app`` at once; replies are kept until pulled.

    ``tamper`` lets a test rewrite a node's reply (Byzantine or broken clients). ``live`` (when
    given) says which node ids are connected now. A ClientApp that raises gets an error reply,
    as Flower's runtimes give.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_config: Mapping[str, ConfigValue] | None = None,
        node_config: Callable[[int], Mapping[str, ConfigValue]] | None = None,
        tamper: Callable[[int, Message], Message | None] | None = None,
        live: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        # A fresh run id per grid, as Flower gives each run: per-run client state never leaks across runs.
        self.run_id = uuid.uuid4().int >> 65
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, 0, 1
        self.client_app = client_app
        self.tamper = tamper
        self.live = live
        self._replies: dict[str, Message] = {}
        self._run: Run | None = None
        self.contexts = {
            1000 + i: Context(
                run_id=self.run_id,
                node_id=1000 + i,
                state=RecordDict(),
                node_config=dict(
                    node_config(i) if node_config else {"partition-id": i, "num-partitions": num_nodes}
                ),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self.delivered: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("LocalGrid has no run; call set_run() first")
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts) if self.live is None else [n for n in self.live() if n in self.contexts]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for original in messages:
            msg = wire_round_trip(original)
            # Flower's runtimes assign message ids; here a fresh id per delivery (identical contents
            # sent to several nodes would otherwise share one content-derived id).
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            self.delivered.append(msg)
            node = msg.metadata.dst_node_id
            reply: Message | None
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as exc:  # as Flower does: the exception becomes an error reply
                reply = Message(error=Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if self.tamper is not None and reply is not None:
                reply = self.tamper(node, reply)
            if reply is not None:
                self._replies[mid] = wire_round_trip(reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_local(
    cfg: RunConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    state_dir: Path | None = None,
    tamper: Callable[[int, Message], Message | None] | None = None,
    live: Callable[[], Iterable[int]] | None = None,
    node_config: Callable[[int], Mapping[str, ConfigValue]] | None = None,
    settle_s: float = 0.0,
    stop_after: int | None = None,
    quiet: bool = True,
) -> tuple[dict[str, MetricValue], LocalGrid]:
    """Run ``cfg`` through the real ServerApp loop and ClientApp code on a :class:`LocalGrid`.

    Node ``i`` is partition ``i`` with client state under ``state_dir`` (a fresh temporary folder
    unless given; pass the same one to resume). Node ids are ``1000 + i``.
    """
    n = cfg.federation.num_clients
    root = str(state_dir) if state_dir is not None else tempfile.mkdtemp(prefix="fedtune-state-")

    def default_node_config(i: int) -> Mapping[str, ConfigValue]:
        return {"partition-id": i, "num-partitions": n, "state-dir": root}

    grid = LocalGrid(
        build_client_app(cfg.to_flat()),
        n,
        node_config=node_config or default_node_config,
        tamper=tamper,
        live=live,
    )
    loop = RunLoop(
        cfg,
        GridTransport(grid),
        run_dir=run_dir,
        resume=resume,
        quiet=quiet,
        settle_s=settle_s,
        stop_after=stop_after,
    )
    return loop.run(), grid
