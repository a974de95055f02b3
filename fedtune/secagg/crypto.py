"""The cryptographic primitives of secure aggregation, all from ``cryptography``.

* X25519 key agreement; every client makes fresh key pairs each round, so a dropped client's s-key
  reconstructed in one round unmasks nothing in any other round.
* HKDF-SHA256 to 32-byte keys; ``info`` binds the purpose and the (unordered) node pair, the salt binds
  the run key and round, so a key derived for one use is useless for any other.
* Mask generator: the ChaCha20 keystream under a 256-bit seed, read as little-endian uint64.
* Share encryption: ChaCha20-Poly1305 with a random 12-byte nonce and associated data binding
  (run key, round, sender, receiver), so a share replayed from another round or pair fails to open.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Final

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.secagg.errors import SecAggError, ShareDecryptionError
from fedtune.secagg.quantize import U64Array

DOMAIN: Final = b"fedtune-secagg-v1"
SHARE_KEY: Final = DOMAIN + b" share-key"
PAIR_MASK: Final = DOMAIN + b" pair-mask"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_PRG_NONCE: Final = bytes(16)  # every PRG key expands one stream only, so a fixed nonce is safe


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw ``(private, public)`` bytes, 32 each."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def public_from_private(private: bytes) -> bytes:
    """The raw public key of a raw private key (checks a rebuilt key against the broadcast one)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def check_public_key(public: bytes) -> None:
    """ValueError unless ``public`` is a 32-byte X25519 key whose agreements are not all zero.

    A low-order point gives the all-zero secret with every private key; refusing it at the keys stage
    keeps one bad key from failing every honest client later.
    """
    if len(public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(public)}")
    X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))


def derive_key(
    private: bytes, peer_public: bytes, purpose: bytes, run_key: str, server_round: int, a: int, b: int
) -> bytes:
    """The 32-byte key nodes ``a`` and ``b`` share for ``purpose`` in this run and round (symmetric)."""
    try:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:
        raise SecAggError(
            f"key agreement between nodes {a} and {b} failed ({exc}); a public key is bad"
        ) from exc
    lo, hi = sorted((a, b))
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=_salt(run_key, server_round),
        info=purpose + b"\x00" + struct.pack("<QQ", lo, hi),
    ).derive(secret)


def prg(seed: bytes, length: int) -> U64Array:
    """``length`` uint64 mask words: the ChaCha20 keystream under the 32-byte ``seed``."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"a mask seed is {KEY_BYTES} bytes, got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, _PRG_NONCE), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def share_aad(run_key: str, server_round: int, sender: int, receiver: int) -> bytes:
    """Associated data of a share ciphertext: the run, the round and the (ordered) sender -> receiver."""
    return _salt(run_key, server_round) + struct.pack("<QQ", sender, receiver)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce || ciphertext || tag`` under a random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes, sender: int) -> bytes:
    """The plaintext of :func:`seal`, or :class:`ShareDecryptionError` naming ``sender``."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareDecryptionError(sender, f"{len(blob)} bytes is shorter than a nonce and tag")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise ShareDecryptionError(sender, "forged, corrupted, or from another round or node pair") from exc


def _salt(run_key: str, server_round: int) -> bytes:
    run = run_key.encode("utf-8")
    return hashlib.sha256(
        DOMAIN + struct.pack("<I", len(run)) + run + struct.pack("<Q", server_round)
    ).digest()
