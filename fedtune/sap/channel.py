"""The split channel: per-step gRPC traffic between SAP clients and the split server's trunk.

Flower messages cost 0.1-6 s each, so a round's steps travel over the project's own `SplitServer`
service (proto/fedtune/v1/split.proto) instead: one bidirectional `StepStream` per client session,
lock-step (send one request, wait for its reply), plus unary `Step` for one-off predictions.

Access control: Flower delivers each client a per-round stream id and a random token; every call
carries both as metadata (`STREAM_KEY`, `TOKEN_KEY`). An interceptor refuses calls without a valid
pair before any request is read (UNAUTHENTICATED), and the stream re-checks the pair on every
request, so `SplitChannelServer.revoke` takes effect mid-stream. TLS is optional (`ServerTLS`);
without it the token travels in clear, which is acceptable on loopback only.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from concurrent.futures import thread as _futures_thread  # noqa: F401  (registers its exit hook now)
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NoReturn

import grpc

from fedtune._proto.v1 import split_pb2, split_pb2_grpc

logger = logging.getLogger(__name__)

STREAM_KEY: Final = "x-fedtune-stream"
TOKEN_KEY: Final = "x-fedtune-token"
DEFAULT_MAX_MESSAGE_BYTES: Final = 256 * 2**20  # gRPC's default 4 MB receive limit is below one activation
MAX_CREDENTIAL_CHARS: Final = 256
# Status details travel in a trailer; gRPC's default metadata limit is 8 KiB, so long messages are cut.
MAX_DETAILS_CHARS: Final = 1024
# How long close() waits for the server to end a half-closed stream before cancelling it.
CLOSE_DRAIN_S: Final = 10.0

StepHandler = Callable[[str, split_pb2.StepRequest], split_pb2.StepReply]
StreamEndCallback = Callable[[str, bool], None]


class StepError(Exception):
    """Raised by a `StepHandler` to refuse a request; the client gets INVALID_ARGUMENT with this message."""


class ChannelError(RuntimeError):
    """Any failure seen by `SplitChannelClient`; ``code`` is the gRPC status (e.g. UNAUTHENTICATED)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the two-argument constructor
        return (type(self), (self.code, self.details))


@dataclass(frozen=True)
class ServerTLS:
    """The server's PEM certificate chain and private key (e.g. from `fedtune.wire.tls`)."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for what, pem in (("cert_chain", self.cert_chain), ("private_key", self.private_key)):
            if not isinstance(pem, bytes) or b"-----BEGIN " not in pem:
                raise ValueError(f"ServerTLS.{what} must be PEM bytes, got {type(pem).__name__}")


def _check_credential(what: str, value: object) -> str:
    # Metadata values must be printable ASCII; surrounding spaces may be trimmed by HTTP/2 stacks.
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_CREDENTIAL_CHARS
        or not (value.isascii() and value.isprintable())
        or value != value.strip()
    ):
        raise ValueError(
            f"{what} must be 1..{MAX_CREDENTIAL_CHARS} printable ASCII characters without surrounding "
            f"spaces, got {value!r:.40}"
        )
    return value


def _check_positive_int(what: str, value: object, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(f"{what} must be an int in [1, {maximum}], got {value!r}")
    return value


def _message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _single(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    """The one str value of ``key``; None when it is absent or repeated (ambiguous credentials)."""
    values = [v for k, v in (metadata or ()) if k == key]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    return values[0]


def _truncate(details: str) -> str:
    return details if len(details) <= MAX_DETAILS_CHARS else details[: MAX_DETAILS_CHARS - 3] + "..."


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.abort(code, _truncate(details))  # raises
    raise AssertionError("grpc.ServicerContext.abort returned")  # pragma: no cover


def _deny_handler(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same arity as ``handler`` that refuses the call without reading a request."""

    def deny(_request: object, context: grpc.ServicerContext) -> NoReturn:
        _abort(context, grpc.StatusCode.UNAUTHENTICATED, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def _client_cancelled(context: grpc.ServicerContext) -> bool:
    """Whether a finished RPC was cancelled by the client or lost with its connection.

    The sync server's request iterator can report a cancel that races with its next read as a
    normal end of requests, and the sync API has no public "was cancelled" query, so this reads the
    state that grpcio sets from RECV_CLOSE_ON_SERVER before it runs termination callbacks (checked
    against grpcio 1.85 by tests/sap/test_channel.py). An unknown layout counts as cancelled: a
    stream wrongly reported unclean only makes the trunk discard state it no longer needs.
    """
    client = getattr(getattr(context, "_state", None), "client", None)
    return client != "closed"


class _TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls whose metadata lacks an authorized (stream id, token) pair."""

    def __init__(self, refusal: Callable[[Any], str | None]) -> None:
        self._refusal = refusal

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        reason = self._refusal(handler_call_details.invocation_metadata)
        return handler if reason is None else _deny_handler(handler, reason)


class _StreamState:
    """Book-keeping that lets on_stream_end fire exactly once, and never while the handler runs."""

    __slots__ = ("busy", "clean", "lock", "reported", "terminated")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = False  # the handler is running for this stream
        self.clean = False  # the client half-closed and every request got its reply
        self.terminated = False  # the RPC is over (completed, cancelled or aborted)
        self.reported = False


class _Servicer:
    """The two RPCs of `SplitServer`, bound to their `SplitChannelServer`."""

    def __init__(self, owner: SplitChannelServer) -> None:
        self._owner = owner

    def Step(self, request: split_pb2.StepRequest, context: grpc.ServicerContext) -> split_pb2.StepReply:  # noqa: N802
        owner = self._owner
        stream_id, token = owner._credentials(context)
        owner._admit(stream_id, token, request, context)
        reply = owner._invoke(stream_id, request, context)
        owner._count_sent(reply)
        return reply

    def StepStream(  # noqa: N802
        self, request_iterator: Iterator[split_pb2.StepRequest], context: grpc.ServicerContext
    ) -> Iterator[split_pb2.StepReply]:
        owner = self._owner
        stream_id, token = owner._credentials(context)
        state = _StreamState()

        def terminated() -> None:
            owner._stream_terminated(stream_id, state, cancelled=_client_cancelled(context))

        if not context.add_callback(terminated):  # the RPC already ended
            terminated()
        return owner._serve_stream(stream_id, token, request_iterator, context, state)


_LIVE_SERVERS: weakref.WeakSet[SplitChannelServer] = weakref.WeakSet()


def _stop_live_servers() -> None:
    for server in list(_LIVE_SERVERS):
        server.stop(grace=0)


# An open stream keeps a pool thread inside gRPC's request iterator, and interpreter exit joins pool
# threads (concurrent.futures.thread does that from a threading-atexit hook, registered when that
# module is first imported: above), so a server left running would hang the exit forever. Hooks
# run last-registered first, so this one stops live servers before the pool threads are joined.
# (threading._register_atexit is private but exists since 3.9; without it, call stop().)
_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_stop_live_servers)


class SplitChannelServer:
    """gRPC server for the trunk: authenticates streams and calls ``handler`` per step.

    ``handler(stream_id, request) -> reply`` runs on the server's thread pool, lock-step per stream
    (a stream's requests in order, one at a time) and concurrently across streams, so it must do its
    own locking. Raising `StepError` refuses the request (INVALID_ARGUMENT, its message); any other
    exception is logged and becomes INTERNAL ("Type: message"). Either ends that stream only.

    ``on_stream_end(stream_id, completed_cleanly)`` fires exactly once per `StepStream` (not for
    unary calls) that got past the interceptor: True when the client half-closed after its last
    reply, False when the stream was cancelled, dropped, revoked mid-stream, refused a request
    (stream id mismatch), a handler raised, or the server stopped. It fires only after the last handler
    call has returned (never concurrently with it), so the trunk can discard half-done step state
    (e.g. a U-shaped forward awaiting its backward) without racing the handler. It runs on a
    dedicated thread, one call at a time; exceptions are logged.

    ``workers`` bounds concurrent RPCs (each open stream holds a worker for its lifetime); calls
    beyond it are refused with RESOURCE_EXHAUSTED rather than queued behind long-lived streams.
    """

    def __init__(
        self,
        handler: StepHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTLS | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        workers: int = 8,
        on_stream_end: StreamEndCallback | None = None,
    ) -> None:
        if not callable(handler):
            raise ValueError(f"handler must be callable, got {type(handler).__name__}")
        if on_stream_end is not None and not callable(on_stream_end):
            raise ValueError(f"on_stream_end must be callable or None, got {type(on_stream_end).__name__}")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty str, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535] (0 = ephemeral), got {port!r}")
        if tls is not None and not isinstance(tls, ServerTLS):
            raise ValueError(f"tls must be a ServerTLS or None, got {type(tls).__name__}")
        self._handler = handler
        self._on_stream_end = on_stream_end
        self._host = host
        self._port = port
        self._tls = tls
        self._max_message_bytes = _check_positive_int("max_message_bytes", max_message_bytes, 2**31 - 1)
        self._workers = _check_positive_int("workers", workers, 1024)
        self._lock = threading.Lock()  # guards the token table and the lifecycle fields
        self._tokens: dict[str, bytes] = {}
        self._server: Any = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._callbacks: futures.ThreadPoolExecutor | None = None
        self._address: str | None = None
        self._stopped = False
        self._count_lock = threading.Lock()
        self._bytes_received = 0
        self._bytes_sent = 0
        self._steps = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Bind and serve; returns the "host:port" actually bound (an ephemeral port for port=0)."""
        with self._lock:
            if self._server is not None or self._stopped:
                raise RuntimeError("SplitChannelServer.start() may be called once; create a new server")
            executor = futures.ThreadPoolExecutor(self._workers, thread_name_prefix="fedtune-split")
            server = grpc.server(
                executor,
                interceptors=[_TokenInterceptor(self._refusal)],
                # so_reuseport=0: binding a port another process holds must fail, not share its traffic
                options=[*_message_options(self._max_message_bytes), ("grpc.so_reuseport", 0)],
                maximum_concurrent_rpcs=self._workers,
            )
            split_pb2_grpc.add_SplitServerServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]
            host = f"[{self._host}]" if ":" in self._host and not self._host.startswith("[") else self._host
            bind = f"{host}:{self._port}"
            try:
                if self._tls is None:
                    port = server.add_insecure_port(bind)
                else:
                    creds = grpc.ssl_server_credentials([(self._tls.private_key, self._tls.cert_chain)])
                    port = server.add_secure_port(bind, creds)
            except RuntimeError as e:
                executor.shutdown(wait=False)
                raise RuntimeError(f"cannot bind the split channel to {bind}: {e}") from e
            if not port:
                executor.shutdown(wait=False)
                raise RuntimeError(f"cannot bind the split channel to {bind}")
            server.start()
            _LIVE_SERVERS.add(self)
            self._server = server
            self._executor = executor
            self._callbacks = futures.ThreadPoolExecutor(1, thread_name_prefix="fedtune-split-end")
            self._address = f"{host}:{port}"
            return self._address

    @property
    def address(self) -> str:
        """The bound "host:port"; raises RuntimeError before start()."""
        if self._address is None:
            raise RuntimeError("SplitChannelServer is not started")
        return self._address

    def stop(self, grace: float = 1.0) -> None:
        """Refuse new calls, give open ones ``grace`` seconds, then cancel them. Idempotent.

        Waits at most ``grace`` + 5 s. A handler that never returns keeps its worker thread busy
        (and, like any running pool task, would delay interpreter exit) but does not make stop() hang.
        Servers still running at interpreter exit are stopped by an exit hook.
        """
        if not isinstance(grace, int | float) or not math.isfinite(grace) or grace < 0:
            raise ValueError(f"grace must be a finite number >= 0, got {grace!r}")
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            server, executor, callbacks = self._server, self._executor, self._callbacks
        _LIVE_SERVERS.discard(self)
        if server is None:
            return
        if not server.stop(grace).wait(grace + 5.0):
            logger.warning("split channel %s did not shut down within %.1f s", self._address, grace + 5.0)
        for pool, cancel in ((executor, True), (callbacks, False)):  # pending on_stream_end calls still run
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=cancel)

    def __enter__(self) -> SplitChannelServer:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- access control --------------------------------------------------------------------------

    def authorize(self, stream_id: str, token: str) -> None:
        """Allow calls carrying this (stream id, token) pair; re-authorizing a stream replaces its token."""
        stream_id = _check_credential("stream_id", stream_id)
        secret = _check_credential("token", token).encode()
        with self._lock:
            self._tokens[stream_id] = secret

    def revoke(self, stream_id: str) -> None:
        """Refuse the stream from its next request on, even mid-stream (unknown ids are ignored)."""
        with self._lock:
            self._tokens.pop(stream_id, None)

    def revoke_all(self) -> None:
        with self._lock:
            self._tokens.clear()

    def _token_ok(self, stream_id: str, token: str) -> bool:
        with self._lock:
            expected = self._tokens.get(stream_id)
        return expected is not None and hmac.compare_digest(expected, token.encode())

    def _refusal(self, metadata: Any) -> str | None:
        stream_id = _single(metadata, STREAM_KEY)
        if stream_id is None:
            return f"missing or repeated {STREAM_KEY} metadata"
        token = _single(metadata, TOKEN_KEY)
        if token is None:
            return f"missing or repeated {TOKEN_KEY} metadata"
        if not self._token_ok(stream_id, token):
            return f"stream {stream_id!r:.80} is not authorized (unknown or revoked stream, or wrong token)"
        return None

    # -- serving ---------------------------------------------------------------------------------

    def _credentials(self, context: grpc.ServicerContext) -> tuple[str, str]:
        metadata = context.invocation_metadata()
        stream_id, token = _single(metadata, STREAM_KEY), _single(metadata, TOKEN_KEY)
        if stream_id is None or token is None:  # the interceptor lets no such call through
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing credentials")
        return stream_id, token

    def _admit(
        self, stream_id: str, token: str, request: split_pb2.StepRequest, context: grpc.ServicerContext
    ) -> None:
        if not self._token_ok(stream_id, token):
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, f"stream {stream_id!r:.80} was revoked")
        if request.stream_id != stream_id:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request.stream_id {request.stream_id!r:.80} differs from the {STREAM_KEY} metadata "
                f"{stream_id!r:.80}",
            )
        with self._count_lock:
            self._bytes_received += request.ByteSize()

    def _invoke(
        self, stream_id: str, request: split_pb2.StepRequest, context: grpc.ServicerContext
    ) -> split_pb2.StepReply:
        try:
            reply = self._handler(stream_id, request)
        except StepError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e) or "request refused")
        except Exception as e:
            logger.exception("split step handler failed (stream %r, step %d)", stream_id, request.step)
            _abort(context, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        if not isinstance(reply, split_pb2.StepReply):
            logger.error("split step handler returned %s, not StepReply", type(reply).__name__)
            _abort(context, grpc.StatusCode.INTERNAL, f"TypeError: handler returned {type(reply).__name__}")
        with self._count_lock:
            self._steps += 1
        return reply

    def _count_sent(self, reply: split_pb2.StepReply) -> None:
        with self._count_lock:
            self._bytes_sent += reply.ByteSize()

    def _serve_stream(
        self,
        stream_id: str,
        token: str,
        requests: Iterator[split_pb2.StepRequest],
        context: grpc.ServicerContext,
        state: _StreamState,
    ) -> Iterator[split_pb2.StepReply]:
        for request in requests:  # raises when the client cancels or the connection drops
            self._admit(stream_id, token, request, context)
            with state.lock:
                if state.terminated:
                    return
                state.busy = True
            try:
                reply = self._invoke(stream_id, request, context)
            finally:
                with state.lock:
                    state.busy = False
                    report = state.terminated and not state.reported
                    state.reported = state.reported or report
                if report:  # the stream died while the handler ran
                    self._report_end(stream_id, False)
            self._count_sent(reply)
            yield reply
        with state.lock:
            state.clean = True

    def _stream_terminated(self, stream_id: str, state: _StreamState, *, cancelled: bool) -> None:
        with state.lock:
            state.terminated = True
            if state.busy or state.reported:  # a running handler reports when it returns
                return
            state.reported = True
            clean = state.clean and not cancelled
        self._report_end(stream_id, clean)

    def _report_end(self, stream_id: str, clean: bool) -> None:
        callback = self._on_stream_end
        if callback is None:
            return

        def run() -> None:
            try:
                callback(stream_id, clean)
            except Exception:
                logger.exception("on_stream_end(%r, %s) raised", stream_id, clean)

        # Off gRPC's polling thread: a slow callback there would stall every stream's I/O.
        try:
            if self._callbacks is None:
                raise RuntimeError("not started")
            self._callbacks.submit(run)
        except RuntimeError:  # after stop() shut the executor down
            run()

    # -- measurement -----------------------------------------------------------------------------

    @property
    def bytes_received(self) -> int:
        """Serialized size (ByteSize) of all admitted requests, both RPCs."""
        with self._count_lock:
            return self._bytes_received

    @property
    def bytes_sent(self) -> int:
        """Serialized size of all replies handed to gRPC."""
        with self._count_lock:
            return self._bytes_sent

    @property
    def steps(self) -> int:
        """Handler calls that returned a reply."""
        with self._count_lock:
            return self._steps
