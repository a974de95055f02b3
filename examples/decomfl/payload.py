"""DeComFL's wire format: a small, versioned, ``struct``-packed little-endian layout it owns.

Two messages, each opening with a 4-byte magic and a schema version:

* **sync** (server -> client, ``b"DCFS"``): the round's settings, the server-drawn seeds for the
  round (``tau * P`` uint32 seed indices, step-major: entry ``t * P + p`` is perturbation ``p`` of
  local step ``t``) and the history entries the client has not applied yet: for each aggregated
  round after ``base_round``, its number, learning rate, seeds and aggregated scalars.
* **reply** (client -> server, ``b"DCFR"``): a few counters and the ``tau * P`` float32 projected
  gradients, nothing that grows with the model.

Layouts (all little-endian)::

    sync   = magic "DCFS" | u16 schema | u32 round | u32 base_round | u16 tau | u16 P
             | u32 batch_size | f64 lr | f64 eps | 32 bytes fingerprint (sha256) | u32 num_entries
             | u32 seeds[tau*P]
             | num_entries x (u32 round | f64 lr | u32 seeds[tau*P] | f32 scalars[tau*P])
    reply  = magic "DCFR" | u16 schema | u32 round | u32 synced_round | u32 num_examples
             | u32 num_skipped | u32 n | f64 train_loss | f64 peak_memory_mb | f32 scalars[n]

Decoded bytes are untrusted: every field is checked and any defect raises :class:`PayloadError`
(a ``ValueError``) with a message naming it. Encoding checks the same invariants, so a payload
that encodes always decodes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from fedtune.zo import MAX_SEED_INDEX

SCHEMA_VERSION: Final = 1
SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({SCHEMA_VERSION})
SYNC_MAGIC: Final = b"DCFS"
REPLY_MAGIC: Final = b"DCFR"
MAX_SCALARS_PER_ROUND: Final = 65536
"""Most ``tau * P`` (local steps times perturbations per step) one round may use."""

SYNC_HEADER: Final = struct.Struct("<4sHIIHHIdd32sI")
ENTRY_HEADER: Final = struct.Struct("<Id")
REPLY_HEADER: Final = struct.Struct("<4sHIIIIIdd")
_U32_MAX: Final = 2**32 - 1

Seeds = npt.NDArray[np.uint32]
Scalars = npt.NDArray[np.float32]


class PayloadError(ValueError):
    """A DeComFL payload that does not decode or breaks an invariant."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise PayloadError(message)


def _uint(name: str, value: int, *, low: int = 0, high: int = _U32_MAX) -> None:
    _require(
        not isinstance(value, bool) and isinstance(value, int | np.integer) and low <= int(value) <= high,
        f"{name} must be an integer in [{low}, {high}], got {value!r}",
    )


def _positive_float(name: str, value: float) -> None:
    _require(
        isinstance(value, float | int) and math.isfinite(value) and value > 0,
        f"{name} must be a finite number > 0, got {value!r}",
    )


def check_seeds(name: str, seeds: npt.NDArray[np.generic], count: int) -> None:
    """Raise unless ``seeds`` is ``count`` distinct uint32 indices below :data:`MAX_SEED_INDEX`."""
    _require(
        isinstance(seeds, np.ndarray) and seeds.dtype == np.uint32 and seeds.shape == (count,),
        f"{name} must be a uint32 array of shape ({count},), got "
        f"{getattr(seeds, 'dtype', type(seeds).__name__)} {getattr(seeds, 'shape', '')}",
    )
    _require(
        count == 0 or int(seeds.max()) < MAX_SEED_INDEX,
        f"{name} holds a seed index >= {MAX_SEED_INDEX} (the perturbation's seed space)",
    )
    _require(np.unique(seeds).size == count, f"{name} repeats a seed index; a round's seeds are distinct")


def _check_scalars(name: str, scalars: npt.NDArray[np.generic], count: int) -> None:
    _require(
        isinstance(scalars, np.ndarray) and scalars.dtype == np.float32 and scalars.shape == (count,),
        f"{name} must be a float32 array of shape ({count},), got "
        f"{getattr(scalars, 'dtype', type(scalars).__name__)} {getattr(scalars, 'shape', '')}",
    )
    _require(bool(np.isfinite(scalars).all()), f"{name} holds NaN or Inf")


@dataclass(frozen=True, eq=False)
class HistoryEntry:
    """One aggregated round: every client replays ``-(lr / P) * scalars[k] * z(seeds[k])``."""

    server_round: int
    lr: float
    seeds: Seeds
    scalars: Scalars

    def __post_init__(self) -> None:
        _uint("history round", self.server_round, low=1)
        _positive_float(f"round {self.server_round} lr", self.lr)
        check_seeds(f"round {self.server_round} seeds", self.seeds, int(getattr(self.seeds, "size", -1)))
        _check_scalars(f"round {self.server_round} scalars", self.scalars, int(self.seeds.size))

    def coefficients(self, num_perturbations: int) -> npt.NDArray[np.float64]:
        """The coefficient of each seed in the global model: ``-(lr / P) * scalar`` (float64)."""
        return -(float(self.lr) / num_perturbations) * self.scalars.astype(np.float64)


@dataclass(frozen=True, eq=False)
class SyncPayload:
    """Server -> client: the round's seeds and settings, plus the history after ``base_round``.

    ``base_round`` is the global model version (the last round folded in) the server believes
    the node holds; 0 means "from theta_0", which any node can apply whatever it holds.
    """

    server_round: int
    base_round: int
    num_local_steps: int
    num_perturbations: int
    batch_size: int
    lr: float
    eps: float
    fingerprint: str
    seeds: Seeds
    entries: tuple[HistoryEntry, ...]

    @property
    def num_scalars(self) -> int:
        return self.num_local_steps * self.num_perturbations

    def __post_init__(self) -> None:
        _uint("server_round", self.server_round, low=1)
        _uint("base_round", self.base_round, high=self.server_round - 1)
        _uint("num_local_steps", self.num_local_steps, low=1, high=0xFFFF)
        _uint("num_perturbations", self.num_perturbations, low=1, high=0xFFFF)
        _require(
            self.num_scalars <= MAX_SCALARS_PER_ROUND,
            f"tau * P = {self.num_scalars} exceeds {MAX_SCALARS_PER_ROUND} scalars per round",
        )
        _uint("batch_size", self.batch_size, low=1)
        _positive_float("lr", self.lr)
        _positive_float("eps", self.eps)
        _require(
            isinstance(self.fingerprint, str)
            and len(self.fingerprint) == 64
            and all(c in "0123456789abcdef" for c in self.fingerprint),
            "fingerprint must be a lowercase hex sha256 (64 characters)",
        )
        check_seeds("round seeds", self.seeds, self.num_scalars)
        previous = self.base_round
        for entry in self.entries:
            _require(isinstance(entry, HistoryEntry), "entries must be HistoryEntry objects")
            _require(
                previous < entry.server_round < self.server_round,
                f"history entry for round {entry.server_round} is out of order or outside "
                f"({self.base_round}, {self.server_round})",
            )
            _require(
                entry.seeds.size == self.num_scalars,
                f"history entry for round {entry.server_round} has {entry.seeds.size} seeds, "
                f"expected tau * P = {self.num_scalars}",
            )
            previous = entry.server_round


@dataclass(frozen=True, eq=False)
class ReplyPayload:
    """Client -> server: the projected gradient of every (step, perturbation), and counters.

    ``synced_round`` is the global model version the client started its local steps from.
    ``num_skipped`` counts evaluations with a non-finite loss (their scalar is 0).
    """

    server_round: int
    synced_round: int
    num_examples: int
    num_skipped: int
    train_loss: float
    peak_memory_mb: float
    scalars: Scalars

    def __post_init__(self) -> None:
        _uint("server_round", self.server_round, low=1)
        _uint("synced_round", self.synced_round, high=self.server_round - 1)
        _uint("num_examples", self.num_examples)
        n = int(getattr(self.scalars, "size", 0))
        _require(
            1 <= n <= MAX_SCALARS_PER_ROUND, f"a reply carries 1..{MAX_SCALARS_PER_ROUND} scalars, got {n}"
        )
        _check_scalars("reply scalars", self.scalars, n)
        _uint("num_skipped", self.num_skipped, high=n)
        _require(math.isfinite(self.train_loss), f"train_loss must be finite, got {self.train_loss!r}")
        _require(
            math.isfinite(self.peak_memory_mb) and self.peak_memory_mb >= 0,
            f"peak_memory_mb must be finite and >= 0, got {self.peak_memory_mb!r}",
        )


def _as_bytes(data: object, what: str) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise PayloadError(f"a {what} payload is bytes, got {type(data).__name__}")


_PREFIX: Final = struct.Struct("<4sH")


def _check_head(raw: bytes, expected: bytes, what: str, header: struct.Struct) -> None:
    """Magic and schema first (the clearest message for a foreign payload), then the header size."""
    _require(len(raw) >= _PREFIX.size, f"{what} payload is {len(raw)} bytes, shorter than its header")
    magic, schema = _PREFIX.unpack_from(raw)
    _require(magic == expected, f"not a DeComFL {what} payload (magic {magic!r}, expected {expected!r})")
    _require(
        schema in SUPPORTED_SCHEMA_VERSIONS,
        f"DeComFL {what} schema version {schema} is not supported (this code reads "
        f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}); run the same examples/decomfl on server and clients",
    )
    _require(len(raw) >= header.size, f"{what} payload is {len(raw)} bytes, shorter than its header")


def encode_sync(p: SyncPayload) -> bytes:
    """Pack a validated :class:`SyncPayload`."""
    parts = [
        SYNC_HEADER.pack(
            SYNC_MAGIC,
            SCHEMA_VERSION,
            p.server_round,
            p.base_round,
            p.num_local_steps,
            p.num_perturbations,
            p.batch_size,
            float(p.lr),
            float(p.eps),
            bytes.fromhex(p.fingerprint),
            len(p.entries),
        ),
        p.seeds.astype("<u4").tobytes(),
    ]
    for e in p.entries:
        parts += [
            ENTRY_HEADER.pack(e.server_round, float(e.lr)),
            e.seeds.astype("<u4").tobytes(),
            e.scalars.astype("<f4").tobytes(),
        ]
    return b"".join(parts)


def decode_sync(data: bytes) -> SyncPayload:
    """Unpack and validate a sync payload (PayloadError on any defect)."""
    raw = _as_bytes(data, "sync")
    _check_head(raw, SYNC_MAGIC, "sync", SYNC_HEADER)
    (_, _, rnd, base, tau, num_p, batch, lr, eps, fp, num_entries) = SYNC_HEADER.unpack_from(raw)
    n = tau * num_p
    _require(1 <= n <= MAX_SCALARS_PER_ROUND, f"sync announces tau * P = {n} scalars per round")
    _require(num_entries < max(rnd, 1), f"sync for round {rnd} announces {num_entries} history entries")
    expected = SYNC_HEADER.size + 4 * n + num_entries * (ENTRY_HEADER.size + 8 * n)
    _require(len(raw) == expected, f"sync payload is {len(raw)} bytes; its header announces {expected}")
    offset = SYNC_HEADER.size
    seeds = np.frombuffer(raw, dtype="<u4", count=n, offset=offset).astype(np.uint32)
    offset += 4 * n
    entries: list[HistoryEntry] = []
    for _ in range(num_entries):
        e_round, e_lr = ENTRY_HEADER.unpack_from(raw, offset)
        offset += ENTRY_HEADER.size
        e_seeds = np.frombuffer(raw, dtype="<u4", count=n, offset=offset).astype(np.uint32)
        offset += 4 * n
        e_scalars = np.frombuffer(raw, dtype="<f4", count=n, offset=offset).astype(np.float32)
        offset += 4 * n
        entries.append(HistoryEntry(e_round, e_lr, e_seeds, e_scalars))
    return SyncPayload(rnd, base, tau, num_p, batch, lr, eps, fp.hex(), seeds, tuple(entries))


def encode_reply(p: ReplyPayload) -> bytes:
    """Pack a validated :class:`ReplyPayload`."""
    head = REPLY_HEADER.pack(
        REPLY_MAGIC,
        SCHEMA_VERSION,
        p.server_round,
        p.synced_round,
        p.num_examples,
        p.num_skipped,
        int(p.scalars.size),
        float(p.train_loss),
        float(p.peak_memory_mb),
    )
    return head + p.scalars.astype("<f4").tobytes()


def decode_reply(data: bytes) -> ReplyPayload:
    """Unpack and validate a reply payload (PayloadError on any defect)."""
    raw = _as_bytes(data, "reply")
    _check_head(raw, REPLY_MAGIC, "reply", REPLY_HEADER)
    _, _, rnd, synced, num_examples, skipped, n, loss, peak = REPLY_HEADER.unpack_from(raw)
    _require(1 <= n <= MAX_SCALARS_PER_ROUND, f"reply announces {n} scalars")
    expected = REPLY_HEADER.size + 4 * n
    _require(len(raw) == expected, f"reply payload is {len(raw)} bytes; its header announces {expected}")
    scalars = np.frombuffer(raw, dtype="<f4", count=n, offset=REPLY_HEADER.size).astype(np.float32)
    return ReplyPayload(rnd, synced, num_examples, skipped, loss, peak, scalars)
