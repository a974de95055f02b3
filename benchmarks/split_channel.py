"""The split channel's own cost per SAP step (bytes and latency), next to one Flower message round trip.

Split-and-privatize LoRA exchanges activations with the split server once per local step, over the
project's gRPC service (``fedtune/sap/channel.py``) rather than Flower messages, because a Flower round
trip is polled (~0.1 s in simulation, 3-6 s in deployment). This benchmark measures, in one process:

* bytes per step: the serialized ``StepRequest`` / ``StepReply`` sizes (protobuf ``ByteSize``) that the
  channel counters report, summed over the messages of one step (the U-shaped split sends two: TRAIN,
  then BACKWARD). gRPC's 5-byte message prefix, HTTP/2 frames and TLS records are not included;
  ``raw_tensor_bytes_*`` is the bare ndarray bytes, for the protobuf overhead;
* per-step latency over a real ``SplitChannelServer`` on loopback, one lock-step bidirectional stream
  per payload (plaintext and TLS with a fresh test PKI), plus unary ``call()`` for the classification
  payload: median, min and max over the timed steps, after a warm-up on the same stream;
* for comparison, a minimal Flower Message-API app run with ``flwr.simulation.run_simulation`` (one
  node, a ClientApp that echoes): each ``grid.send_and_receive`` of one small message is timed inside
  the ServerApp, the first one (actor start-up) skipped. That figure is quantised: the in-memory grid
  pulls every 0.1 s and the simulation's queue feeder sweeps every 0.1 s, and back-to-back round trips
  would keep the phase between the two loops for a whole run (one run reading ~100 ms throughout,
  another ~200 ms), so each send waits a random 0-100 ms first (an explicit generator, outside the
  timed part) and the median is over the phases real traffic meets.

The step handler does no compute: it returns a reply of the right shape (a loss, or a zero
``trunk_output`` serialized with ``to_tensor`` as the real service does) without decoding or
validating the request, so these are transport figures only. The end-to-end SAP step time
(privatization + trunk forward/backward + this channel) is reported by
``fedtune simulate simulations/sap.toml`` in ``metrics.jsonl`` as ``split_step_ms``.

Every request is built once per payload and reused (only its ``step`` number changes) across the
plaintext, TLS and unary runs; nothing is cached between steps: each step serializes, sends, parses
and answers a full message.

Usage: ``python benchmarks/split_channel.py [--quick]`` (``--quick``: 30 steps, no Flower; well under
a minute). A full run writes ``benchmarks/results/split_channel.json``. The last line printed is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

# Before anything imports flwr or starts Ray (its workers inherit the environment); the same settings
# as fedtune/flower/sim.py.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np
import numpy.typing as npt

from fedtune._proto.v1 import split_pb2 as pb
from fedtune.sap.channel import ServerTLS, SplitChannelServer
from fedtune.sap.channel_client import SplitChannelClient
from fedtune.sap.tensors import to_tensor
from fedtune.wire.tls import write_test_pki

RESULTS: Final = Path(__file__).resolve().parent / "results"
FULL_REPS: Final = 200
QUICK_REPS: Final = 30
WARMUP: Final = 10
FLOWER_REPS: Final = 20
UNARY_PAYLOADS: Final = frozenset({"classification-standard"})
RATIO_BASE: Final = "classification-standard"
STEP_TIMEOUT_S: Final = 60.0
FLOWER_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True)
class Payload:
    """One SAP step's requests (two for the U-shaped split), built once and reused for every step."""

    name: str
    requests: tuple[pb.StepRequest, ...]
    raw_bytes_up: int  # the bare ndarray bytes of all requests of one step
    raw_bytes_down: int  # the same for the replies the trivial handler sends


def _rng(name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, len(name), *name.encode()])))


def _mask(rng: np.random.Generator, batch: int, seq: int) -> npt.NDArray[np.uint8]:
    """1 = token, 0 = padding: each row keeps a random-length prefix (at least one token)."""
    lengths = rng.integers(1, seq + 1, size=batch)
    return (np.arange(seq)[None, :] < lengths[:, None]).astype(np.uint8)


def _train_request(
    activations: npt.NDArray[Any], mask: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64] | None
) -> pb.StepRequest:
    request = pb.StepRequest(
        stream_id="",  # set to the stream's id when the payload is sent
        kind=pb.STEP_KIND_TRAIN,
        activations=to_tensor(activations),
        attention_mask=to_tensor(mask),
    )
    if labels is not None:
        request.labels.CopyFrom(to_tensor(labels))
    return request


def _standard(name: str, batch: int, seq: int, width: int, dtype: str, lm: bool) -> Payload:
    rng = _rng(name)
    acts = rng.standard_normal((batch, seq, width), dtype=np.float32).astype(dtype)
    mask = _mask(rng, batch, seq)
    labels = rng.integers(0, 49152 if lm else 2, size=(batch, seq) if lm else (batch,), dtype=np.int64)
    raw = acts.nbytes + mask.nbytes + labels.nbytes
    return Payload(name, (_train_request(acts, mask, labels),), raw_bytes_up=raw, raw_bytes_down=0)


def _u_shaped(name: str, batch: int, seq: int, width: int) -> Payload:
    rng = _rng(name)
    acts = rng.standard_normal((batch, seq, width), dtype=np.float32)
    mask = _mask(rng, batch, seq)
    grad = rng.standard_normal((batch, width), dtype=np.float32)
    backward = pb.StepRequest(stream_id="", kind=pb.STEP_KIND_BACKWARD, upstream_grad=to_tensor(grad))
    raw_down = batch * width * 4  # the pooled trunk_output of the TRAIN reply
    return Payload(
        name,
        (_train_request(acts, mask, None), backward),
        raw_bytes_up=acts.nbytes + mask.nbytes + grad.nbytes,
        raw_bytes_down=raw_down,
    )


def _text(name: str, batch: int, seq: int, vocab: int) -> Payload:
    rng = _rng(name)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    mask = _mask(rng, batch, seq)
    labels = rng.integers(0, 2, size=(batch,), dtype=np.int64)
    raw = ids.nbytes + mask.nbytes + labels.nbytes
    return Payload(name, (_train_request(ids, mask, labels),), raw_bytes_up=raw, raw_bytes_down=0)


# MiniLM (width 384, classification, B 16 x S 48) and SmolLM2-135M (width 576, causal LM, B 8 x S 64).
PAYLOADS: Final[dict[str, Callable[[], Payload]]] = {
    "classification-standard": lambda: _standard("classification-standard", 16, 48, 384, "<f4", lm=False),
    "classification-standard-fp16": lambda: _standard(
        "classification-standard-fp16", 16, 48, 384, "<f2", lm=False
    ),
    "classification-u-shaped": lambda: _u_shaped("classification-u-shaped", 16, 48, 384),
    "causal-lm-standard": lambda: _standard("causal-lm-standard", 8, 64, 576, "<f4", lm=True),
    "text-variant": lambda: _text("text-variant", 16, 48, 30522),
}


def trivial_handler(_stream_id: str, request: pb.StepRequest) -> pb.StepReply:
    """A reply of the right shape, computing nothing (the trunk's work is measured elsewhere)."""
    if request.kind == pb.STEP_KIND_BACKWARD:
        return pb.StepReply(step=request.step, trunk_steps=request.step + 1)
    if request.HasField("labels"):  # standard split (and text variant) TRAIN: the batch loss
        return pb.StepReply(step=request.step, loss=0.6931, trunk_steps=request.step + 1)
    # U-shaped TRAIN: the pooled trunk output B x d; d from the activations' last dimension
    shape = request.activations.shape
    pooled = np.zeros((int(shape[0]), int(shape[-1])), dtype=np.float32)
    return pb.StepReply(step=request.step, trunk_output=to_tensor(pooled), trunk_steps=request.step)


def stats_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min and max in milliseconds."""
    if not seconds:
        raise ValueError("no timings")
    ms = [s * 1e3 for s in seconds]
    return {"median": round(statistics.median(ms), 3), "min": round(min(ms), 3), "max": round(max(ms), 3)}


class Channels:
    """A plaintext and a TLS `SplitChannelServer` on loopback, both with `trivial_handler`."""

    def __init__(self, pki_dir: Path) -> None:
        files = write_test_pki(pki_dir)
        self.root_certificates = files.ca_cert.read_bytes()
        tls = ServerTLS(cert_chain=files.server_cert.read_bytes(), private_key=files.server_key.read_bytes())
        self.servers = {
            False: SplitChannelServer(trivial_handler, host="127.0.0.1", port=0),
            True: SplitChannelServer(trivial_handler, host="127.0.0.1", port=0, tls=tls),
        }
        self.addresses = {tls_on: server.start() for tls_on, server in self.servers.items()}
        self._streams = 0

    def client(self, *, tls: bool) -> tuple[SplitChannelClient, str]:
        """A client on a freshly authorized stream (its own id and token), and that stream id."""
        self._streams += 1
        stream_id, token = f"bench-{self._streams}", secrets.token_urlsafe(16)
        self.servers[tls].authorize(stream_id, token)
        client = SplitChannelClient(
            self.addresses[tls],
            stream_id=stream_id,
            token=token,
            root_certificates=self.root_certificates if tls else None,
            timeout_s=STEP_TIMEOUT_S,
        )
        return client, stream_id

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop(grace=0)


@contextmanager
def open_channels() -> Iterator[Channels]:
    with tempfile.TemporaryDirectory(prefix="fedtune-split-bench-") as tmp:
        channels = Channels(Path(tmp) / "pki")
        try:
            yield channels
        finally:
            channels.stop()


@dataclass
class Timed:
    seconds: list[float]
    bytes_up: int  # server counter totals over the timed steps
    bytes_down: int


def time_steps(
    channels: Channels, payload: Payload, *, tls: bool, unary: bool, warmup: int, reps: int
) -> Timed:
    """``warmup`` untimed then ``reps`` timed steps on one client session (one stream unless unary)."""
    server = channels.servers[tls]
    seconds: list[float] = []
    client, stream_id = channels.client(tls=tls)
    with client:
        send = client.call if unary else client.step
        for request in payload.requests:
            request.stream_id = stream_id
        up0 = down0 = client_up0 = client_down0 = 0
        for step in range(warmup + reps):
            if step == warmup:
                up0, down0 = server.bytes_received, server.bytes_sent
                client_up0, client_down0 = client.bytes_sent, client.bytes_received
            for request in payload.requests:  # a BACKWARD repeats its TRAIN step's number
                request.step = step
            start = time.perf_counter()
            for request in payload.requests:
                reply = send(request)
            elapsed = time.perf_counter() - start
            if reply.step != step:
                raise RuntimeError(f"{payload.name}: reply for step {reply.step}, expected {step}")
            if step >= warmup:
                seconds.append(elapsed)
        up, down = server.bytes_received - up0, server.bytes_sent - down0
        if (up, down) != (client.bytes_sent - client_up0, client.bytes_received - client_down0):
            raise RuntimeError(f"{payload.name}: client and server byte counters disagree")
    return Timed(seconds, up, down)


def measure_payloads(
    names: Sequence[str], *, reps: int, warmup: int = WARMUP, tls: bool = True
) -> dict[str, dict[str, Any]]:
    """Bytes and latency per step for each named payload (see the module docstring)."""
    unknown = [n for n in names if n not in PAYLOADS]
    if unknown:
        raise ValueError(f"unknown payloads {unknown}; choose from {sorted(PAYLOADS)}")
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    results: dict[str, dict[str, Any]] = {}
    with open_channels() as channels:
        for name in names:
            payload = PAYLOADS[name]()
            stream = time_steps(channels, payload, tls=False, unary=False, warmup=warmup, reps=reps)
            row: dict[str, Any] = {
                "messages_per_step": len(payload.requests),
                "bytes_up_per_step": round(stream.bytes_up / reps),
                "bytes_down_per_step": round(stream.bytes_down / reps),
                "raw_tensor_bytes_up": payload.raw_bytes_up,
                "raw_tensor_bytes_down": payload.raw_bytes_down,
                "stream_ms": stats_ms(stream.seconds),
            }
            if tls:
                secure = time_steps(channels, payload, tls=True, unary=False, warmup=warmup, reps=reps)
                row["tls_stream_ms"] = stats_ms(secure.seconds)
            if name in UNARY_PAYLOADS:
                unary = time_steps(channels, payload, tls=False, unary=True, warmup=warmup, reps=reps)
                row["unary_ms"] = stats_ms(unary.seconds)
            results[name] = row
            print(f"# {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return results


def flower_round_trips(reps: int) -> list[float]:
    """Seconds per ``grid.send_and_receive`` of one small message to one echoing node (Ray simulation).

    ``reps + 1`` round trips, the first (the ClientApp actor's start-up) dropped. Raises on any failure.
    """
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    times: list[float] = []
    errors: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            deadline = time.monotonic() + FLOWER_TIMEOUT_S
            while not (nodes := sorted(int(n) for n in grid.get_node_ids())):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no SuperNode registered within {FLOWER_TIMEOUT_S:g} s")
                time.sleep(0.05)
            # Flower's simulation polls on 0.1 s loops; back-to-back sends lock onto one phase for a
            # whole run (every trip ~0.1 s, or every trip ~0.2 s). A random pause before each send,
            # outside the timed part, samples the phases as real traffic would.
            pause = np.random.default_rng(0)
            for i in range(reps + 1):
                time.sleep(float(pause.uniform(0.0, 0.1)))
                content = RecordDict({"ping": ConfigRecord({"i": i})})
                msg = Message(content, nodes[0], MessageType.TRAIN, group_id=str(i))
                start = time.perf_counter()
                replies = list(grid.send_and_receive([msg], timeout=FLOWER_TIMEOUT_S))
                elapsed = time.perf_counter() - start
                if len(replies) != 1 or replies[0].has_error():
                    reason = replies[0].error.reason if replies and replies[0].has_error() else "no reply"
                    raise RuntimeError(f"round trip {i} failed: {reason}")
                if replies[0].content["ping"]["i"] != i:
                    raise RuntimeError(f"round trip {i}: the echo carried another message")
                if i > 0:
                    times.append(elapsed)
        except BaseException as e:  # reported by the caller; Flower would only log it
            errors.append(e)

    client_app = ClientApp()

    @client_app.train()
    def echo(msg: Message, context: Context) -> Message:
        return Message(msg.content, reply_to=msg)

    from fedtune.flower.sim import run_apps

    run_apps(server_app, client_app, num_supernodes=1)
    if errors:
        raise RuntimeError(f"ServerApp failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    if len(times) != reps:
        raise RuntimeError(f"got {len(times)} of {reps} timed round trips")
    return times


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_REPS} steps per figure and no Flower")
    p.add_argument(
        "--reps", type=int, default=None, help=f"timed steps per figure ({FULL_REPS}; quick {QUICK_REPS})"
    )
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps first, on the same stream")
    p.add_argument("--flower-reps", type=int, default=FLOWER_REPS, help="timed Flower round trips")
    p.add_argument("--no-flower", action="store_true", help="skip the Flower round trip (implied by --quick)")
    p.add_argument("--payloads", default=",".join(PAYLOADS), help="comma-separated payload names")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default: results/split_channel.json unless --quick)",
    )
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    if args.warmup < 0 or args.flower_reps < 1:
        p.error("--warmup must be >= 0 and --flower-reps >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    reps = args.reps or (QUICK_REPS if args.quick else FULL_REPS)
    names = [n.strip() for n in args.payloads.split(",") if n.strip()]
    payloads = measure_payloads(names, reps=reps, warmup=args.warmup)

    flower: dict[str, float] | None = None
    flower_note: str | None = None
    if args.quick or args.no_flower:
        flower_note = "skipped (--quick)" if args.quick else "skipped (--no-flower)"
    else:
        flower_t0 = time.perf_counter()
        try:
            flower = stats_ms(flower_round_trips(args.flower_reps))
            flower_note = (
                f"run_simulation, 1 SuperNode; {time.perf_counter() - flower_t0:.1f} s incl. Ray start"
            )
        except (Exception, SystemExit) as e:  # Ray could not start, or the app failed: record, don't crash
            flower_note = f"failed: {type(e).__name__}: {e}"
    base = payloads.get(RATIO_BASE, {}).get("stream_ms")
    ratio = round(flower["median"] / base["median"], 1) if flower and base else None

    import torch  # only for the thread count the house style reports; the channel does not use torch

    result: dict[str, Any] = {
        "benchmark": "split_channel",
        "quick": args.quick,
        "payloads": payloads,
        "flower_round_trip_ms": flower,
        "flower_note": flower_note,
        "ratio_flower_over_split_step": ratio,
        "reps": reps,
        "warmup": args.warmup,
        "flower_reps": None if flower is None else args.flower_reps,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out = args.out or (None if args.quick else RESULTS / "split_channel.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
