"""The client and server state machines of one secure-aggregation round (Bonawitz et al. 2017).

Stages, with U1 ⊇ U2 ⊇ U3 the clients still in after each (fewer than ``threshold`` aborts the round):

1. setup -> keys: each client makes fresh X25519 key pairs c (share encryption) and s (pairwise masks).
2. keys broadcast -> shares: each client Shamir-splits its self-mask seed b_u and its s private key
   among U1 and sends each other node its pair of shares, AEAD-encrypted under their c agreement.
3. mask request -> masked input: y_u = encode(x_u) + PRG(b_u) + sum_v sign(u, v) * PRG(s_uv) mod 2^64
   over v in U2; pairwise masks cancel in the sum over U2.
4. unmask request -> shares: for each survivor (U3) its b-share, for each dropped node (U2 \\ U3) its
   s-share; the server rebuilds b_u and s_v from any t replies and strips the remaining masks.

Every sampled client is a neighbour of every other (the complete graph of the original protocol;
SecAgg+'s sparse neighbourhoods are not built), so a client does O(n) agreements and mask expansions.

Threat model: semi-honest server. Public keys are relayed unsigned, so an active server could substitute
keys and read shares; what a client does refuse is an unmask request naming a node both survivor and
dropped, which would hand the server both masks of that node. Keys are fresh each round.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from enum import IntEnum
from typing import Final, NoReturn, TypeVar

import numpy as np
import numpy.typing as npt

from fedtune._proto.v1 import secagg_pb2 as pb
from fedtune.secagg import crypto, shamir
from fedtune.secagg.codec import (
    SECAGG_SCHEMA_VERSION,
    cts_from_pb,
    cts_to_pb,
    keys_from_pb,
    parse_state,
    setup_from_pb,
    to_pb,
)
from fedtune.secagg.errors import SecAggAbort, SecAggError, SecAggPayloadError, SecAggStageError
from fedtune.secagg.messages import (
    KeysBroadcast,
    KeysReply,
    MaskedInput,
    MaskRequest,
    NodeKeys,
    SetupRequest,
    SharesReply,
    UnmaskReply,
    UnmaskRequest,
)
from fedtune.secagg.quantize import F64Array, U64Array

_R = TypeVar("_R", KeysReply, SharesReply, MaskedInput, UnmaskReply)
Replies = Mapping[int, _R] | Iterable[_R]
_SHARE: Final = shamir.SHARE_BYTES


class _Next(IntEnum):
    """The next call a state machine accepts (stored in the client's saved state)."""

    SETUP = 1
    KEYS = 2
    SHARES = 3
    MASK = 4
    UNMASK = 5
    DONE = 6
    ABORTED = 7


def _sign_mask(mask: U64Array, total: U64Array, add: bool) -> None:
    if add:
        total += mask
    else:
        total -= mask


# ============================================================================= client
class SecAggClient:
    """One client's side of a round: call ``handle_setup``, ``handle_keys``, ``handle_mask``,
    ``handle_unmask`` in order (each refuses any other order).

    Between stages the state can be kept on disk with :meth:`to_bytes` / :meth:`from_bytes`. It holds
    private keys: the runtime must write it to the node's private folder with 0600 permissions and
    delete it after stage 4.
    """

    def __init__(self) -> None:
        self._next = _Next.SETUP
        self._node = 0
        self._setup: SetupRequest | None = None
        self._c_sk = b""
        self._s_sk = b""
        self._keys: KeysBroadcast | None = None
        self._b_seed = b""
        self._own_b = b""
        self._own_s = b""
        self._u2: tuple[int, ...] = ()
        self._cts: tuple[tuple[int, bytes], ...] = ()

    @property
    def node_id(self) -> int:
        return self._node

    @property
    def done(self) -> bool:
        return self._next == _Next.DONE

    # -- stage 1 -------------------------------------------------------------------------------
    def handle_setup(self, req: SetupRequest, node_id: int) -> KeysReply:
        """Make this round's fresh key pairs; reply with the public halves."""
        self._expect(_Next.SETUP, "handle_setup")
        if node_id not in req.participants:
            raise SecAggError(f"node {node_id} is not among the round's participants {req.participants}")
        self._node, self._setup = node_id, req
        self._c_sk, c_pk = crypto.generate_keypair()
        self._s_sk, s_pk = crypto.generate_keypair()
        self._next = _Next.KEYS
        return KeysReply(node_id, c_pk, s_pk)

    # -- stage 2 -------------------------------------------------------------------------------
    def handle_keys(self, bcast: KeysBroadcast) -> SharesReply:
        """Check the broadcast keys, draw b_u, and send every other node its encrypted shares."""
        self._expect(_Next.KEYS, "handle_keys")
        setup, u = self._need_setup(), self._node
        nodes = bcast.nodes
        strangers = sorted(set(nodes) - set(setup.participants))
        if strangers:
            raise SecAggError(f"the key broadcast lists non-participants {strangers}")
        mine = {k.node_id: k for k in bcast.keys}.get(u)
        own = (crypto.public_from_private(self._c_sk), crypto.public_from_private(self._s_sk))
        if mine is None or (mine.c_public, mine.s_public) != own:
            raise SecAggError(f"the key broadcast omits or alters node {u}'s own keys; the server is faulty")
        all_keys = [k.c_public for k in bcast.keys] + [k.s_public for k in bcast.keys]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError("the key broadcast repeats a public key; keys must be distinct per node")
        if len(nodes) < setup.threshold:
            raise SecAggError(
                f"the key broadcast lists {len(nodes)} nodes, below threshold {setup.threshold}"
            )
        self._b_seed = secrets.token_bytes(shamir.SECRET_BYTES)
        xs = [setup.x_of(v) for v in nodes]
        b_shares = shamir.split(self._b_seed, xs, setup.threshold)
        s_shares = shamir.split(self._s_sk, xs, setup.threshold)
        cts: list[tuple[int, bytes]] = []
        for k in bcast.keys:
            x = setup.x_of(k.node_id)
            pair = shamir.share_to_bytes(b_shares[x]) + shamir.share_to_bytes(s_shares[x])
            if k.node_id == u:
                self._own_b, self._own_s = pair[:_SHARE], pair[_SHARE:]
                continue
            key = self._share_key(k)
            aad = crypto.share_aad(setup.run_key, setup.server_round, u, k.node_id)
            cts.append((k.node_id, crypto.seal(key, pair, aad)))
        self._keys = bcast
        self._next = _Next.MASK
        return SharesReply(u, tuple(cts))

    # -- stage 3 -------------------------------------------------------------------------------
    def handle_mask(self, req: MaskRequest, vector: npt.ArrayLike) -> MaskedInput:
        """Store the shares addressed to this node and upload the double-masked encoding of ``vector``."""
        self._expect(_Next.MASK, "handle_mask")
        setup, keys, u = self._need_setup(), self._need_keys(), self._node
        u2 = req.participants_u2
        if not set(u2) <= set(keys.nodes) or u not in u2:
            raise SecAggError(f"U2 {u2} must be a subset of U1 {keys.nodes} containing node {u}")
        if len(u2) < setup.threshold:
            raise SecAggError(f"U2 has {len(u2)} nodes, below threshold {setup.threshold}")
        senders = {v for v, _ in req.ciphertexts}
        if senders != set(u2) - {u}:
            raise SecAggError(
                f"the mask request carries shares from {sorted(senders)}, not from U2 minus {u}"
            )
        x = np.asarray(vector, dtype=np.float64)
        if x.shape != (setup.vector_length,):
            raise ValueError(f"vector has shape {x.shape}, the round expects ({setup.vector_length},)")
        masked, clipped = setup.quantizer().encode(x)
        masked = masked.copy()
        masked += crypto.prg(self._b_seed, setup.vector_length)
        by_node = {k.node_id: k for k in keys.keys}
        for v in u2:
            if v != u:
                seed = crypto.derive_key(
                    self._s_sk, by_node[v].s_public, crypto.PAIR_MASK, setup.run_key, setup.server_round, u, v
                )
                _sign_mask(crypto.prg(seed, setup.vector_length), masked, add=u < v)
        self._u2, self._cts = u2, req.ciphertexts
        self._next = _Next.UNMASK
        return MaskedInput(u, masked, clipped)

    # -- stage 4 -------------------------------------------------------------------------------
    def handle_unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """Reveal the b-share of each survivor and the s-share of each dropped node, never both of one."""
        self._expect(_Next.UNMASK, "handle_unmask")
        setup, keys, u = self._need_setup(), self._need_keys(), self._node
        survivors, dropped = set(req.survivors), set(req.dropped)
        both = sorted(survivors & dropped)
        if both:
            raise SecAggError(
                f"the unmask request lists {both} as both survivor and dropped; answering would reveal "
                "both masks of those nodes, so this client refuses"
            )
        if survivors | dropped != set(self._u2):
            raise SecAggError(
                f"survivors {req.survivors} and dropped {req.dropped} must partition U2 {self._u2}"
            )
        if len(survivors) < setup.threshold:
            raise SecAggError(f"{len(survivors)} survivors is below threshold {setup.threshold}")
        by_node = {k.node_id: k for k in keys.keys}
        pairs: dict[int, tuple[int, int]] = {u: (self._own_int(self._own_b), self._own_int(self._own_s))}
        for v, ct in self._cts:
            key = self._share_key(by_node[v])
            aad = crypto.share_aad(setup.run_key, setup.server_round, v, u)
            plain = crypto.open_sealed(key, ct, aad, sender=v)
            if len(plain) != 2 * _SHARE:
                raise SecAggError(f"the shares from node {v} decrypt to {len(plain)} bytes, not {2 * _SHARE}")
            try:
                pairs[v] = (shamir.share_from_bytes(plain[:_SHARE]), shamir.share_from_bytes(plain[_SHARE:]))
            except ValueError as exc:
                raise SecAggError(f"the shares from node {v} are malformed: {exc}") from exc
        b_out = tuple((v, pairs[v][0]) for v in sorted(survivors))
        s_out = tuple((v, pairs[v][1]) for v in sorted(dropped))
        self._wipe()
        self._next = _Next.DONE
        return UnmaskReply(u, b_out, s_out)

    # -- persistence ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """``SecAggClientState`` bytes (private keys included: store 0600, delete after stage 4)."""
        state = pb.SecAggClientState(
            schema_version=SECAGG_SCHEMA_VERSION,
            stage=int(self._next),
            node_id=self._node,
            c_private=self._c_sk,
            s_private=self._s_sk,
            self_mask_seed=self._b_seed,
            own_b_share=self._own_b,
            own_s_share=self._own_s,
            participants_u2=self._u2,
            ciphertexts=cts_to_pb(self._cts),
        )
        if self._setup is not None:
            state.setup.CopyFrom(to_pb(self._setup))
        if self._keys is not None:
            state.keys.CopyFrom(to_pb(self._keys))
        return state.SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggClient:
        """A client restored from :meth:`to_bytes`; corrupt or inconsistent state: SecAggPayloadError."""
        state = parse_state(data)
        out = cls()
        try:
            out._next = _Next(state.stage)
            out._node = state.node_id
            started = out._next in (_Next.KEYS, _Next.MASK, _Next.UNMASK)
            if started:
                out._setup = setup_from_pb(state.setup)
                out._c_sk, out._s_sk = state.c_private, state.s_private
                _need_len("c_private", out._c_sk, crypto.KEY_BYTES)
                _need_len("s_private", out._s_sk, crypto.KEY_BYTES)
            if out._next in (_Next.MASK, _Next.UNMASK):
                out._keys = keys_from_pb(state.keys)
                out._b_seed, out._own_b, out._own_s = (
                    state.self_mask_seed,
                    state.own_b_share,
                    state.own_s_share,
                )
                _need_len("self_mask_seed", out._b_seed, shamir.SECRET_BYTES)
                _need_len("own_b_share", out._own_b, _SHARE)
                _need_len("own_s_share", out._own_s, _SHARE)
            if out._next == _Next.UNMASK:
                req = MaskRequest(tuple(state.participants_u2), cts_from_pb(state.ciphertexts))
                out._u2, out._cts = req.participants_u2, req.ciphertexts
        except ValueError as exc:
            raise SecAggPayloadError(f"invalid SecAggClientState: {exc}") from exc
        return out

    # -- helpers -------------------------------------------------------------------------------
    def _expect(self, stage: _Next, call: str) -> None:
        if self._next != stage:
            raise SecAggStageError(f"{call} called while the client expects {self._next.name.lower()}")

    def _need_setup(self) -> SetupRequest:
        if self._setup is None:
            raise SecAggStageError("the client has no setup; call handle_setup first")
        return self._setup

    def _need_keys(self) -> KeysBroadcast:
        if self._keys is None:
            raise SecAggStageError("the client has no key broadcast; call handle_keys first")
        return self._keys

    def _share_key(self, peer: NodeKeys) -> bytes:
        setup = self._need_setup()
        return crypto.derive_key(
            self._c_sk, peer.c_public, crypto.SHARE_KEY, setup.run_key, setup.server_round, self._node,
            peer.node_id,
        )  # fmt: skip

    @staticmethod
    def _own_int(share: bytes) -> int:
        return shamir.share_from_bytes(share)

    def _wipe(self) -> None:
        """Forget everything but the node id once the round is over (private keys first of all)."""
        self._c_sk = self._s_sk = self._b_seed = self._own_b = self._own_s = b""
        self._setup, self._keys, self._u2, self._cts = None, None, (), ()


def _need_len(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} is {len(value)} bytes, expected {size}")


# ============================================================================= server
class SecAggServer:
    """The server's side of a round: ``collect_keys``, ``collect_shares``, ``collect_masked``,
    ``collect_unmask`` in order; each takes the replies that arrived and returns the next requests.

    Replies may come as a mapping ``{sender node: reply}`` (the transport's authenticated sender, which
    must match the reply's ``node_id``) or as a plain iterable. Replies from nodes outside the stage's
    set, duplicates and invalid ones are dropped with the reason in :attr:`rejected`; fewer than
    ``threshold`` accepted raises :class:`SecAggAbort`, after which every call raises SecAggStageError.
    """

    def __init__(
        self,
        *,
        run_key: str,
        server_round: int,
        participants: Iterable[int],
        threshold: int,
        vector_length: int,
        fraction_bits: int,
        clip: float,
    ) -> None:
        setup = SetupRequest(
            run_key, server_round, tuple(participants), threshold, vector_length, fraction_bits, clip
        )
        self.setup = setup
        self.rejected: dict[int, str] = {}
        self.clipped = 0
        self._next = _Next.KEYS
        self._keys: dict[int, KeysReply] = {}
        self._cts: dict[int, dict[int, bytes]] = {}
        self._u2: tuple[int, ...] = ()
        self._u3: tuple[int, ...] | None = None
        self._total: U64Array = np.zeros(setup.vector_length, dtype=np.uint64)

    def setup_requests(self) -> dict[int, SetupRequest]:
        """Stage 1: the same :class:`SetupRequest` for every participant."""
        return {node: self.setup for node in self.setup.participants}

    @property
    def survivors(self) -> tuple[int, ...]:
        """U3: the clients whose vectors are in the sum (available after ``collect_masked``)."""
        if self._u3 is None:
            raise SecAggStageError("survivors are known only after collect_masked")
        return self._u3

    def collect_keys(self, replies: Replies[KeysReply]) -> dict[int, KeysBroadcast]:
        """U1 = the nodes with valid, distinct keys; each gets the same broadcast."""
        self._expect(_Next.KEYS, "collect_keys")
        got = self._accept("keys", replies, KeysReply, set(self.setup.participants), _check_keys)
        owners: dict[bytes, list[int]] = {}
        for node, r in got.items():
            for key in {r.c_public, r.s_public}:
                owners.setdefault(key, []).append(node)
        for nodes in owners.values():
            for node in nodes if len(nodes) > 1 else ():
                self.rejected[node] = f"keys: a public key is also claimed by nodes {sorted(nodes)}"
                got.pop(node, None)
        self._require("keys", got)
        self._keys = dict(sorted(got.items()))
        bcast = KeysBroadcast(tuple(NodeKeys(n, r.c_public, r.s_public) for n, r in self._keys.items()))
        self._next = _Next.SHARES
        return {node: bcast for node in self._keys}

    def collect_shares(self, replies: Replies[SharesReply]) -> dict[int, MaskRequest]:
        """U2 = the nodes of U1 that sent a ciphertext to every other node of U1; route them."""
        self._expect(_Next.SHARES, "collect_shares")
        u1 = set(self._keys)

        def check(r: SharesReply) -> str | None:
            to = {v for v, _ in r.ciphertexts}
            if to != u1 - {r.node_id}:
                return f"addressed shares to {sorted(to)}, not to every other node of U1 {sorted(u1)}"
            return None

        got = self._accept("shares", replies, SharesReply, u1, check)
        self._require("shares", got)
        self._cts = {n: dict(r.ciphertexts) for n, r in sorted(got.items())}
        self._u2 = tuple(self._cts)
        self._next = _Next.MASK
        return {
            w: MaskRequest(self._u2, tuple((v, self._cts[v][w]) for v in self._u2 if v != w))
            for w in self._u2
        }

    def collect_masked(self, replies: Replies[MaskedInput]) -> dict[int, UnmaskRequest]:
        """U3 = the nodes of U2 with a vector of the right length; add them up, ask for unmasking."""
        self._expect(_Next.MASK, "collect_masked")
        length = self.setup.vector_length

        def check(r: MaskedInput) -> str | None:
            return None if r.masked.size == length else f"sent {r.masked.size} words, expected {length}"

        got = self._accept("masked", replies, MaskedInput, set(self._u2), check)
        self._require("masked", got)
        for r in got.values():
            self._total += r.masked
            self.clipped += r.clipped
        self._u3 = tuple(sorted(got))
        req = UnmaskRequest(self._u3, tuple(v for v in self._u2 if v not in got))
        self._next = _Next.UNMASK
        return {node: req for node in self._u3}

    def collect_unmask(self, replies: Replies[UnmaskReply]) -> F64Array:
        """Rebuild the survivors' b_u and the dropped nodes' s keys; return the decoded sum over U3."""
        self._expect(_Next.UNMASK, "collect_unmask")
        setup, u3 = self.setup, self.survivors
        dropped = tuple(v for v in self._u2 if v not in u3)

        def check(r: UnmaskReply) -> str | None:
            if tuple(v for v, _ in r.b_shares) != u3 or tuple(v for v, _ in r.s_shares) != dropped:
                return f"shares do not cover survivors {u3} (b) and dropped {dropped} (s)"
            return None

        got = self._accept("unmask", replies, UnmaskReply, set(u3), check)
        self._require("unmask", got)
        holders = sorted(got)
        b_by = {n: dict(got[n].b_shares) for n in holders}
        s_by = {n: dict(got[n].s_shares) for n in holders}
        total, length = self._total.copy(), setup.vector_length
        for u in u3:
            seed = self._reconstruct(u, "self-mask seed", holders, b_by)
            total -= crypto.prg(seed, length)
        for v in dropped:
            s_sk = self._reconstruct(v, "mask key", holders, s_by)
            if crypto.public_from_private(s_sk) != self._keys[v].s_public:
                self._abort(f"unmask: the rebuilt mask key of node {v} does not match its public key")
            for u in u3:
                seed = crypto.derive_key(
                    s_sk, self._keys[u].s_public, crypto.PAIR_MASK, setup.run_key, setup.server_round, u, v
                )
                _sign_mask(crypto.prg(seed, length), total, add=u > v)  # undo u's sign(u, v) * PRG
        self._next = _Next.DONE
        return setup.quantizer().decode(total)

    # -- helpers -------------------------------------------------------------------------------
    def _reconstruct(
        self, node: int, what: str, holders: list[int], shares: dict[int, dict[int, int]]
    ) -> bytes:
        points = [(self.setup.x_of(w), shares[w][node]) for w in holders]
        try:
            return shamir.combine(points, self.setup.threshold)
        except ValueError as exc:
            self._abort(f"unmask: cannot rebuild the {what} of node {node}: {exc}")

    def _accept(
        self, stage: str, replies: Replies[_R], kind: type[_R], allowed: set[int],
        check: Callable[[_R], str | None],
    ) -> dict[int, _R]:  # fmt: skip
        pairs: list[tuple[int | None, object]] = (
            list(replies.items()) if isinstance(replies, Mapping) else [(None, r) for r in replies]
        )
        got: dict[int, _R] = {}
        conflicting: set[int] = set()
        for sender, r in pairs:
            if not isinstance(r, kind):
                if sender is None:
                    raise SecAggStageError(
                        f"collect_{stage} takes {kind.__name__} replies, got {type(r).__name__}"
                    )
                self.rejected[sender] = f"{stage}: sent a {type(r).__name__}, expected a {kind.__name__}"
                continue
            node = r.node_id
            if sender is not None and sender != node:
                self.rejected[sender] = f"{stage}: the reply from node {sender} claims to be from node {node}"
            elif node not in allowed:
                self.rejected[node] = (
                    f"{stage}: node is not expected at this stage (not a participant or dropped)"
                )
            elif node in got or node in conflicting:
                if node in got and r == got[node]:
                    self.rejected[node] = f"{stage}: duplicate reply ignored (identical to the first)"
                else:
                    self.rejected[node] = (
                        f"{stage}: conflicting duplicate replies; node dropped from the stage"
                    )
                    got.pop(node, None)
                    conflicting.add(node)
            elif (reason := check(r)) is not None:
                self.rejected[node] = f"{stage}: {reason}"
                conflicting.add(node)
            else:
                got[node] = r
        return got

    def _require(self, stage: str, got: dict[int, _R]) -> None:
        if len(got) < self.setup.threshold:
            self._abort(
                f"{stage}: only {len(got)} valid replies, below threshold {self.setup.threshold}; "
                "the round is dropped"
            )

    def _abort(self, reason: str) -> NoReturn:
        self._next = _Next.ABORTED
        raise SecAggAbort(reason)

    def _expect(self, stage: _Next, call: str) -> None:
        if self._next != stage:
            raise SecAggStageError(f"{call} called while the server is at {self._next.name.lower()}")


def _check_keys(r: KeysReply) -> str | None:
    for name, key in (("c_public", r.c_public), ("s_public", r.s_public)):
        try:
            crypto.check_public_key(key)
        except ValueError as exc:
            return f"{name} is not a usable X25519 key ({exc})"
    return None
