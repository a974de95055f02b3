"""The split channel's client: one lock-step ``StepStream`` session per client and round.

Kept apart from the server (:mod:`fedtune.sap.channel`) so a client process imports only what it
dials with; the access-control and error contract is described there.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import grpc

from fedtune._proto.v1 import split_pb2, split_pb2_grpc
from fedtune.sap.channel import (
    CLOSE_DRAIN_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    STREAM_KEY,
    TOKEN_KEY,
    ChannelError,
    _check_credential,
    _check_positive_int,
    _message_options,
)

logger = logging.getLogger(__name__)


class _StreamEnd:
    """Queued by the reader thread when the reply stream ends; ``error`` is None for status OK."""

    __slots__ = ("error",)

    def __init__(self, error: ChannelError | None) -> None:
        self.error = error


def _channel_error(e: grpc.RpcError) -> ChannelError:
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return ChannelError(code, details or "(no details)")


def _requests_from(q: queue.SimpleQueue[split_pb2.StepRequest | None]) -> Iterator[split_pb2.StepRequest]:
    while (request := q.get()) is not None:  # None = half-close
        yield request


def _read_replies(call: Any, out: queue.SimpleQueue[split_pb2.StepReply | _StreamEnd]) -> None:
    try:
        for reply in call:
            out.put(reply)
    except grpc.RpcError as e:
        out.put(_StreamEnd(_channel_error(e)))
    except Exception as e:  # e.g. a reply that does not parse; never leave step() waiting
        out.put(_StreamEnd(ChannelError(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")))
    else:
        out.put(_StreamEnd(None))


class SplitChannelClient:
    """One client session on the split channel: a lock-step `StepStream` opened on the first step.

    ``timeout_s`` bounds each step's wait for its reply (and each unary `call`), not the session:
    a round of many steps may run far longer than one step. Every failure raises `ChannelError`;
    after a stream failure the session is over and later steps raise again (open a new client).
    Use as a context manager: a normal exit closes cleanly (the server sees completed_cleanly=True),
    an exception cancels the stream (False), so the trunk drops half-done state.
    """

    def __init__(
        self,
        address: str,
        *,
        stream_id: str,
        token: str,
        root_certificates: bytes | None = None,
        timeout_s: float = 300.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if not isinstance(address, str) or not address:
            raise ValueError(f"address must be a non-empty 'host:port' str, got {address!r}")
        if root_certificates is not None and not isinstance(root_certificates, bytes):
            raise ValueError(
                f"root_certificates must be PEM bytes or None, got {type(root_certificates).__name__}"
            )
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 < timeout_s < math.inf
        ):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        self._stream_id = _check_credential("stream_id", stream_id)
        self._metadata = ((STREAM_KEY, self._stream_id), (TOKEN_KEY, _check_credential("token", token)))
        self._timeout_s = float(timeout_s)
        options = _message_options(_check_positive_int("max_message_bytes", max_message_bytes, 2**31 - 1))
        if root_certificates is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds, options=options)
        self._stub = split_pb2_grpc.SplitServerStub(self._channel)  # type: ignore[no-untyped-call]
        self._step_lock = threading.Lock()  # one step at a time: lock-step
        self._state_lock = threading.Lock()  # guards the fields below; never held while waiting
        self._call: Any = None
        self._reader: threading.Thread | None = None
        self._requests: queue.SimpleQueue[split_pb2.StepRequest | None] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[split_pb2.StepReply | _StreamEnd] = queue.SimpleQueue()
        self._in_flight = False
        self._closed = False
        self._failure: ChannelError | None = None
        self._bytes_sent = 0
        self._bytes_received = 0
        self._steps = 0

    def _check_usable(self) -> None:
        if self._closed:
            raise ChannelError(grpc.StatusCode.FAILED_PRECONDITION, "the split channel client is closed")
        if self._failure is not None:
            raise ChannelError(self._failure.code, f"the stream already failed: {self._failure.details}")

    def step(self, request: split_pb2.StepRequest) -> split_pb2.StepReply:
        """Send ``request`` on the session's stream and wait for its reply."""
        with self._step_lock:
            with self._state_lock:
                self._check_usable()
                if self._call is None:
                    self._call = self._stub.StepStream(
                        _requests_from(self._requests), metadata=self._metadata
                    )
                    self._reader = threading.Thread(
                        target=_read_replies,
                        args=(self._call, self._replies),
                        name=f"fedtune-split-reader-{self._stream_id[:32]}",
                        daemon=True,  # never keeps the interpreter alive
                    )
                    self._reader.start()
                self._in_flight = True
                self._requests.put(request)
                self._bytes_sent += request.ByteSize()
            try:
                item = self._replies.get(timeout=self._timeout_s)
            except queue.Empty:
                self._call.cancel()
                item = _StreamEnd(
                    ChannelError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no reply to step {request.step} within {self._timeout_s:g} s",
                    )
                )
            with self._state_lock:
                self._in_flight = False
                if isinstance(item, _StreamEnd):
                    self._requests.put(None)  # let gRPC's request-consuming thread finish
                    self._failure = item.error or ChannelError(
                        grpc.StatusCode.UNKNOWN,
                        f"the server ended the stream without replying to step {request.step}",
                    )
                    raise ChannelError(self._failure.code, self._failure.details)
                self._bytes_received += item.ByteSize()
                self._steps += 1
                return item

    def call(self, request: split_pb2.StepRequest) -> split_pb2.StepReply:
        """One unary `Step` call (single predictions), independent of the stream."""
        with self._state_lock:
            if self._closed:
                raise ChannelError(grpc.StatusCode.FAILED_PRECONDITION, "the split channel client is closed")
            self._bytes_sent += request.ByteSize()
        try:
            reply: split_pb2.StepReply = self._stub.Step(
                request, metadata=self._metadata, timeout=self._timeout_s
            )
        except grpc.RpcError as e:
            raise _channel_error(e) from None
        with self._state_lock:
            self._bytes_received += reply.ByteSize()
            self._steps += 1
        return reply

    def close(self) -> None:
        """End the session: half-close the stream, wait for the server's status, close the channel.

        Idempotent. Called while another thread waits in step(), it cancels instead (the server then
        reports completed_cleanly=False and that step() raises ChannelError CANCELLED).
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            call, reader, in_flight = self._call, self._reader, self._in_flight
        if call is not None and reader is not None:
            if in_flight:
                call.cancel()
            self._requests.put(None)  # half-close; after a cancel it just ends the request generator
            reader.join(min(self._timeout_s, CLOSE_DRAIN_S))
            if reader.is_alive():
                logger.warning("split server did not end stream %r within the drain time", self._stream_id)
                call.cancel()
        self._channel.close()

    def cancel(self) -> None:
        """End the session abruptly (the server reports completed_cleanly=False). Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            call = self._call
        if call is not None:
            call.cancel()
            self._requests.put(None)
        self._channel.close()

    def __enter__(self) -> SplitChannelClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()

    @property
    def bytes_sent(self) -> int:
        """Serialized size (ByteSize) of every request handed to gRPC, stream and unary."""
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        """Serialized size of every reply received."""
        return self._bytes_received

    @property
    def steps(self) -> int:
        """Replies received (stream steps and unary calls)."""
        return self._steps
