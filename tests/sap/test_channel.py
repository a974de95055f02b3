"""Split channel on loopback: lock-step streams, byte counters, auth deny paths, TLS, stream-end
reporting on clean close / cancel / dropped connection, handler error mapping, lifecycle."""

from __future__ import annotations

import functools
import logging
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedtune._proto.v1 import split_pb2, split_pb2_grpc
from fedtune.sap.channel import (
    STREAM_KEY,
    TOKEN_KEY,
    ChannelError,
    ServerTLS,
    SplitChannelServer,
    StepError,
)
from fedtune.sap.channel_client import SplitChannelClient
from fedtune.sap.tensors import from_tensor, to_tensor
from fedtune.wire.tls import make_ca, make_server_cert

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 10.0  # generous upper bound for events that normally take milliseconds


def request(stream_id: str, step: int, n: int = 4) -> split_pb2.StepRequest:
    acts = np.arange(n, dtype=np.float32) + step
    return split_pb2.StepRequest(
        stream_id=stream_id, step=step, activations=to_tensor(acts), kind=split_pb2.STEP_KIND_TRAIN
    )


class Echo:
    """Sums the activations and returns 2x them as the gradient; can block inside one step."""

    def __init__(self, block_at: int | None = None) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.block_at = block_at
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()
        self.barrier: threading.Barrier | None = None

    def __call__(self, stream_id: str, req: split_pb2.StepRequest) -> split_pb2.StepReply:
        with self.lock:
            self.calls += 1
        if self.barrier is not None and req.step == 0:
            self.barrier.wait()  # proves that two streams are inside the handler at once
        acts = from_tensor(req.activations, name="activations", dtypes={"<f4"}, ndim=1)
        if req.step == self.block_at:
            self.entered.set()
            self.release.wait(WAIT_S)
            self.returned.set()
        return split_pb2.StepReply(step=req.step, loss=float(acts.sum()), grad=to_tensor(acts * 2))


class Ends:
    """Records on_stream_end calls."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool]] = []
        self.cond = threading.Condition()

    def __call__(self, stream_id: str, clean: bool) -> None:
        with self.cond:
            self.events.append((stream_id, clean))
            self.cond.notify_all()

    def wait(self, n: int) -> list[tuple[str, bool]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.events) >= n, WAIT_S), self.events
            return list(self.events)


@pytest.fixture
def echo() -> Iterator[Echo]:
    handler = Echo()
    yield handler
    handler.release.set()  # never leave a worker blocked


@pytest.fixture
def ends() -> Ends:
    return Ends()


@pytest.fixture
def server(echo: Echo, ends: Ends) -> Iterator[SplitChannelServer]:
    srv = SplitChannelServer(echo, on_stream_end=ends)
    srv.start()
    srv.authorize("s1", "t1")
    srv.authorize("s2", "t2")
    yield srv
    srv.stop(0)


@pytest.fixture
def clients() -> Iterator[Callable[..., SplitChannelClient]]:
    made: list[SplitChannelClient] = []

    def make(address: str, stream_id: str = "s1", token: str = "t1", **kw: Any) -> SplitChannelClient:
        client = SplitChannelClient(address, stream_id=stream_id, token=token, **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        client.cancel()


def expect_code(code: grpc.StatusCode, fn: Callable[[], object], match: str | None = None) -> ChannelError:
    with pytest.raises(ChannelError, match=match) as info:
        fn()
    assert info.value.code == code, info.value
    assert str(info.value).startswith(code.name)
    return info.value


# -- happy path ------------------------------------------------------------------------------------


def test_lockstep_stream_and_byte_counters(
    server: SplitChannelServer, clients: Callable[..., SplitChannelClient], ends: Ends
) -> None:
    client = clients(server.address)
    sent = received = 0
    for step in range(50):
        req = request("s1", step, n=8 + step)
        reply = client.step(req)
        assert reply.step == step
        assert reply.loss == pytest.approx(float((np.arange(8 + step) + step).sum()))
        np.testing.assert_array_equal(
            from_tensor(reply.grad, name="grad", dtypes={"<f4"}), (np.arange(8 + step) + step) * 2.0
        )
        sent += req.ByteSize()
        received += reply.ByteSize()
    unary = request("s1", 50)
    reply = client.call(unary)
    sent += unary.ByteSize()
    received += reply.ByteSize()
    assert ends.events == []  # one stream, still open
    client.close()
    client.close()  # idempotent
    assert ends.wait(1) == [("s1", True)]
    assert client.steps == server.steps == 51
    assert sent > 0 and received > 0
    assert client.bytes_sent == server.bytes_received == sent
    assert client.bytes_received == server.bytes_sent == received
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, lambda: client.step(request("s1", 51)))


def test_two_streams_run_concurrently(
    server: SplitChannelServer, clients: Callable[..., SplitChannelClient], echo: Echo, ends: Ends
) -> None:
    echo.barrier = threading.Barrier(2, timeout=WAIT_S)  # both streams' step 0 must overlap
    errors: list[BaseException] = []

    def run(stream_id: str, token: str) -> None:
        try:
            with clients(server.address, stream_id, token) as client:
                for step in range(30):
                    assert client.step(request(stream_id, step)).step == step
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=a) for a in (("s1", "t1"), ("s2", "t2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert errors == []
    assert sorted(ends.wait(2)) == [("s1", True), ("s2", True)]
    assert server.steps == 60


# -- authentication --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream_id", "token"),
    [("s1", "wrong"), ("nobody", "t1"), ("s1", "t2")],
    ids=["wrong", "unknown", "other"],
)
@pytest.mark.parametrize("method", ["step", "call"])
def test_bad_credentials_are_refused(
    server: SplitChannelServer,
    clients: Callable[..., SplitChannelClient],
    echo: Echo,
    ends: Ends,
    stream_id: str,
    token: str,
    method: str,
) -> None:
    client = clients(server.address, stream_id, token)
    fn = getattr(client, method)
    expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: fn(request(stream_id, 0)), "not authorized")
    assert echo.calls == 0 and server.steps == 0 and server.bytes_received == 0
    if method == "step":  # a refused stream never started: nothing to report; the session stays failed
        expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: client.step(request(stream_id, 1)), "already")
    assert ends.events == []


@pytest.mark.parametrize(
    ("metadata", "missing"),
    [(((TOKEN_KEY, "t1"),), STREAM_KEY), (((STREAM_KEY, "s1"),), TOKEN_KEY), ((), STREAM_KEY)],
    ids=["no-stream", "no-token", "none"],
)
def test_missing_metadata_is_refused_on_both_methods(
    server: SplitChannelServer, echo: Echo, metadata: tuple[tuple[str, str], ...], missing: str
) -> None:
    # SplitChannelClient always sends both keys, so talk to the server with the raw stub.
    with grpc.insecure_channel(server.address) as channel:
        stub = split_pb2_grpc.SplitServerStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as unary:
            stub.Step(request("s1", 0), metadata=metadata, timeout=WAIT_S)
        with pytest.raises(grpc.RpcError) as stream:
            next(iter(stub.StepStream(iter([request("s1", 0)]), metadata=metadata, timeout=WAIT_S)))
    for info in (unary, stream):
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert missing in info.value.details()
    assert echo.calls == 0


def test_revoked_stream_is_refused_mid_session(
    server: SplitChannelServer, clients: Callable[..., SplitChannelClient], echo: Echo, ends: Ends
) -> None:
    client = clients(server.address)
    for step in range(3):
        client.step(request("s1", step))
    server.revoke("s1")
    expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: client.step(request("s1", 3)), "revoked")
    expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: client.call(request("s1", 3)))
    assert echo.calls == 3
    assert ends.wait(1) == [("s1", False)]
    server.revoke_all()
    expect_code(
        grpc.StatusCode.UNAUTHENTICATED, lambda: clients(server.address, "s2", "t2").call(request("s2", 0))
    )
    server.authorize("s1", "t1-new")  # re-authorizing replaces the token
    assert clients(server.address, "s1", "t1-new").step(request("s1", 0)).step == 0


def test_request_stream_id_must_match_metadata(
    server: SplitChannelServer, clients: Callable[..., SplitChannelClient], echo: Echo
) -> None:
    client = clients(server.address)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.call(request("s2", 0)), "differs")
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.step(request("s2", 0)), "differs")
    assert echo.calls == 0


def test_credentials_are_validated() -> None:
    server = SplitChannelServer(Echo())
    for bad in ("", " t", "tok\n", "é", "x" * 300):
        with pytest.raises(ValueError, match="token"):
            server.authorize("s1", bad)
        with pytest.raises(ValueError, match="stream_id"):
            SplitChannelClient("127.0.0.1:1", stream_id=bad, token="t")
    with pytest.raises(ValueError, match="timeout_s"):
        SplitChannelClient("127.0.0.1:1", stream_id="s", token="t", timeout_s=0)
    with pytest.raises(ValueError, match="port"):
        SplitChannelServer(Echo(), port=70000)


# -- TLS -------------------------------------------------------------------------------------------


def test_tls(echo: Echo, clients: Callable[..., SplitChannelClient]) -> None:
    ca_key, ca_cert = make_ca("split-test-ca")
    key, cert = make_server_cert(ca_key, ca_cert, ["localhost", "127.0.0.1"])
    _, other_ca = make_ca("other-ca")
    with SplitChannelServer(echo, tls=ServerTLS(cert_chain=cert, private_key=key)) as server:
        server.authorize("s1", "t1")
        port = server.address.rsplit(":", 1)[1]
        for address in (server.address, f"localhost:{port}"):
            client = clients(address, root_certificates=ca_cert)
            assert client.step(request("s1", 0)).step == 0
            assert client.call(request("s1", 1)).step == 1
            client.close()
        calls = echo.calls
        plain = clients(server.address, timeout_s=WAIT_S)
        expect_code(grpc.StatusCode.UNAVAILABLE, lambda: plain.call(request("s1", 0)))
        expect_code(grpc.StatusCode.UNAVAILABLE, lambda: plain.step(request("s1", 0)))
        wrong_ca = clients(server.address, root_certificates=other_ca, timeout_s=WAIT_S)
        expect_code(grpc.StatusCode.UNAVAILABLE, lambda: wrong_ca.call(request("s1", 0)))
        expect_code(grpc.StatusCode.UNAVAILABLE, lambda: wrong_ca.step(request("s1", 0)))
        assert echo.calls == calls
    assert "private_key" not in repr(ServerTLS(cert_chain=cert, private_key=key))  # keys stay out of logs
    with pytest.raises(ValueError, match="PEM"):
        ServerTLS(cert_chain=cert, private_key=b"not a key")


# -- stream end reporting --------------------------------------------------------------------------


def test_close_during_a_step_cancels_and_is_reported_after_the_handler(
    server: SplitChannelServer, clients: Callable[..., SplitChannelClient], echo: Echo, ends: Ends
) -> None:
    echo.block_at = 2
    client = clients(server.address)
    client.step(request("s1", 0))
    client.step(request("s1", 1))
    failure: list[ChannelError] = []

    def third() -> None:
        try:
            client.step(request("s1", 2))
        except ChannelError as e:
            failure.append(e)

    worker = threading.Thread(target=third)
    worker.start()
    assert echo.entered.wait(WAIT_S)
    client.close()  # abrupt: a step is in flight
    worker.join(WAIT_S)
    assert [e.code for e in failure] == [grpc.StatusCode.CANCELLED]
    time.sleep(0.1)
    assert ends.events == []  # not while the handler still runs for that stream
    echo.release.set()
    assert ends.wait(1) == [("s1", False)]
    assert echo.returned.is_set()
    # the server keeps serving: a new session on the same stream id, cleanly closed
    echo.block_at = None
    with clients(server.address) as again:
        assert again.step(request("s1", 0)).step == 0
    assert ends.wait(2)[1] == ("s1", True)


def test_dropped_connection_is_reported(server: SplitChannelServer, echo: Echo, ends: Ends) -> None:
    """A client process killed while the trunk is inside its step 2 (a real TCP drop)."""
    echo.block_at = 2
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from fedtune._proto.v1 import split_pb2\n"
        "from fedtune.sap.channel_client import SplitChannelClient\n"
        "from fedtune.sap.tensors import to_tensor\n"
        "c = SplitChannelClient(sys.argv[1], stream_id='s1', token='t1')\n"
        "acts = to_tensor(np.ones(4, np.float32))\n"
        "for i in range(5):\n"
        "    c.step(split_pb2.StepRequest(stream_id='s1', step=i, activations=acts))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, server.address], cwd=REPO)
    try:
        assert echo.entered.wait(30.0), "the client process did not reach step 2"
        proc.kill()
        proc.wait(WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    echo.release.set()
    assert ends.wait(1) == [("s1", False)]
    echo.block_at = None
    with SplitChannelClient(server.address, stream_id="s2", token="t2") as client:
        assert client.step(request("s2", 0)).step == 0
    assert ends.wait(2)[1] == ("s2", True)


def test_exception_in_with_block_cancels(
    server: SplitChannelServer, clients: Callable[..., SplitChannelClient], ends: Ends
) -> None:
    with pytest.raises(KeyError), clients(server.address) as client:
        client.step(request("s1", 0))
        raise KeyError("client-side failure")
    assert ends.wait(1) == [("s1", False)]


def test_step_timeout(
    server: SplitChannelServer, clients: Callable[..., SplitChannelClient], echo: Echo, ends: Ends
) -> None:
    echo.block_at = 0
    client = clients(server.address, timeout_s=0.3)
    expect_code(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: client.step(request("s1", 0)), "within 0.3 s")
    echo.release.set()
    assert ends.wait(1) == [("s1", False)]


def test_server_stop_ends_open_streams(echo: Echo, ends: Ends) -> None:
    server = SplitChannelServer(echo, on_stream_end=ends)
    server.start()
    server.authorize("s1", "t1")
    with SplitChannelClient(server.address, stream_id="s1", token="t1") as client:
        client.step(request("s1", 0))
        server.stop(grace=0)
        assert ends.wait(1) == [("s1", False)]
        with pytest.raises(ChannelError) as info:
            client.step(request("s1", 1))
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


# -- handler errors --------------------------------------------------------------------------------


def test_handler_errors_map_to_status_codes(
    clients: Callable[..., SplitChannelClient], ends: Ends, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(stream_id: str, req: split_pb2.StepRequest) -> split_pb2.StepReply:
        if req.step == 1:
            raise StepError("activations: expected rank 3")
        if req.step == 2:
            raise RuntimeError("boom")
        if req.step == 3:
            return "not a reply"  # type: ignore[return-value]
        return split_pb2.StepReply(step=req.step)

    with SplitChannelServer(handler, on_stream_end=ends) as server:
        server.authorize("s1", "t1")
        with caplog.at_level(logging.ERROR, logger="fedtune.sap.channel"):
            for step, code, match in [
                (1, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT: activations: expected rank 3"),
                (2, grpc.StatusCode.INTERNAL, "INTERNAL: RuntimeError: boom"),
                (3, grpc.StatusCode.INTERNAL, "handler returned str"),
            ]:
                client = clients(server.address)
                assert client.step(request("s1", 0)).step == 0
                expect_code(code, functools.partial(client.step, request("s1", step)), match)
                expect_code(code, functools.partial(client.call, request("s1", step)), match)
                assert client.call(request("s1", 0)).step == 0  # the server survives
        assert ends.wait(3) == [("s1", False)] * 3
        boom = [r for r in caplog.records if "handler failed" in r.getMessage()]
        assert len(boom) == 2 and all(r.exc_info for r in boom)  # once per failing call (stream, unary)
        assert server.steps == 6


def test_long_error_details_are_truncated(clients: Callable[..., SplitChannelClient]) -> None:
    def handler(stream_id: str, req: split_pb2.StepRequest) -> split_pb2.StepReply:
        raise StepError("x" * 100_000)

    with SplitChannelServer(handler) as server:
        server.authorize("s1", "t1")
        error = expect_code(
            grpc.StatusCode.INVALID_ARGUMENT, lambda: clients(server.address).step(request("s1", 0))
        )
        assert len(error.details) <= 1024


# -- lifecycle and misc ----------------------------------------------------------------------------


def test_lifecycle() -> None:
    server = SplitChannelServer(Echo())
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.address
    address = server.start()
    assert address == server.address and address.startswith("127.0.0.1:") and not address.endswith(":0")
    with pytest.raises(RuntimeError, match="once"):
        server.start()
    server.stop(0)
    server.stop(0)
    with pytest.raises(RuntimeError, match="once"):
        server.start()
    never_started = SplitChannelServer(Echo())
    never_started.stop()
    never_started.stop()
    # a port in use is refused (no SO_REUSEPORT sharing)
    with SplitChannelServer(Echo()) as holder:
        port = int(holder.address.rsplit(":", 1)[1])
        with pytest.raises(RuntimeError, match="cannot bind"):
            SplitChannelServer(Echo(), port=port).start()


def test_calls_beyond_workers_are_refused_not_queued(
    echo: Echo, clients: Callable[..., SplitChannelClient]
) -> None:
    with SplitChannelServer(echo, workers=1) as server:
        server.authorize("s1", "t1")
        session = clients(server.address)
        session.step(request("s1", 0))  # the open stream holds the only worker
        expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: clients(server.address).call(request("s1", 1))
        )
        session.close()
        assert clients(server.address).call(request("s1", 1)).step == 1


def test_process_exits_with_server_and_client_left_open() -> None:
    """Interpreter exit must not wait forever on a pool thread serving an open stream."""
    script = (
        "from fedtune._proto.v1 import split_pb2\n"
        "from fedtune.sap.channel import SplitChannelServer\n"
        "from fedtune.sap.channel_client import SplitChannelClient\n"
        "s = SplitChannelServer(lambda sid, r: split_pb2.StepReply(step=r.step))\n"
        "s.start()\n"
        "s.authorize('a', 'b')\n"
        "c = SplitChannelClient(s.address, stream_id='a', token='b')\n"
        "print(c.step(split_pb2.StepRequest(stream_id='a', step=7)).step)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "7", done.stderr


def test_large_messages_pass_the_default_limit(
    server: SplitChannelServer, clients: Callable[..., SplitChannelClient]
) -> None:
    client = clients(server.address)
    big = request("s1", 0, n=2_000_000)  # 8 MB, above gRPC's 4 MB default receive limit
    reply = client.step(big)
    assert reply.grad.shape == [2_000_000]
    small = clients(server.address, max_message_bytes=1024)
    expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: small.call(big))


def test_channel_error_pickles() -> None:
    error = ChannelError(grpc.StatusCode.UNAUTHENTICATED, "bad token")
    again = pickle.loads(pickle.dumps(error))
    assert again.code == grpc.StatusCode.UNAUTHENTICATED and str(again) == "UNAUTHENTICATED: bad token"
