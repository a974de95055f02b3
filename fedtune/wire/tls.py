"""X.509 material for TLS on loopback tests and small deployments (split channel, SuperLink), and
SuperNode authentication keys.

A private CA signs one server certificate whose SubjectAlternativeName lists the DNS names and IP
addresses clients dial: gRPC verifies the host name against the SAN only (never the CN), so
"127.0.0.1" must be an IP entry and "localhost" a DNS entry. Keys are EC (P-256 by default):
fast handshakes, small certificates, supported by BoringSSL (gRPC) and OpenSSL alike.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Curve = Literal["P-256", "P-384"]

DEFAULT_HOSTS: Final[tuple[str, ...]] = ("localhost", "127.0.0.1")
DEFAULT_VALID_DAYS: Final = 365
MAX_COMMON_NAME_CHARS: Final = 64  # X.509 upper bound (RFC 5280 ub-common-name)
# Backdating tolerates small clock differences between the machine that signs and the one that verifies.
_BACKDATE: Final = dt.timedelta(minutes=5)

CA_CERT_NAME: Final = "ca.crt"
SERVER_CERT_NAME: Final = "server.pem"
SERVER_KEY_NAME: Final = "server.key"


@dataclass(frozen=True)
class TLSFiles:
    """PEM files written by `write_test_pki`: give ``ca_cert`` to clients, the other two to the server."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _new_key(curve: Curve) -> ec.EllipticCurvePrivateKey:
    if curve == "P-256":
        return ec.generate_private_key(ec.SECP256R1())
    if curve == "P-384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"curve must be 'P-256' or 'P-384', got {curve!r}")


def _hash_for(key: ec.EllipticCurvePrivateKey) -> hashes.SHA256 | hashes.SHA384:
    # Match the digest to the curve strength (what CA/B and webpki policies expect).
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _check_common_name(common_name: object) -> str:
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= MAX_COMMON_NAME_CHARS:
        raise ValueError(
            f"common_name must be a str of 1..{MAX_COMMON_NAME_CHARS} characters, got {common_name!r:.80}"
        )
    return common_name


def _check_valid_days(valid_days: object) -> int:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or not 1 <= valid_days <= 3650:
        raise ValueError(f"valid_days must be an int in [1, 3650], got {valid_days!r}")
    return valid_days


def _validity(valid_days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - _BACKDATE, now + dt.timedelta(days=valid_days)


def _san_entry(host: object) -> x509.GeneralName:
    if not isinstance(host, str) or not host or host != host.strip():
        raise ValueError(f"each host must be a non-empty str without surrounding spaces, got {host!r}")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii() or any(c in host for c in " /:@[]"):
        raise ValueError(
            f"host {host!r} is neither an IP address nor an ASCII DNS name; write IDNs in punycode (xn--...)"
        )
    return x509.DNSName(host)


def make_ca(
    common_name: str, *, curve: Curve = "P-256", valid_days: int = DEFAULT_VALID_DAYS
) -> tuple[bytes, bytes]:
    """A self-signed CA that may sign end-entity certificates only (path length 0).

    Returns ``(key_pem, cert_pem)``: the key as unencrypted PKCS#8, so keep it out of logs and repos.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _check_common_name(common_name))])
    key = _new_key(curve)
    not_before, not_after = _validity(_check_valid_days(valid_days))
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _hash_for(key))
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(ca_key_pem: bytes, ca_cert_pem: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot load the CA key/certificate PEM: {e}") from e
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"the CA key must be an EC key, got {type(ca_key).__name__}; make it with make_ca")
    ca_public = ca_cert.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey) or ca_public.public_numbers() != (
        ca_key.public_key().public_numbers()
    ):
        raise ValueError("the CA key does not belong to the CA certificate; pass the pair make_ca returned")
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError("the CA certificate lacks BasicConstraints ca=True; it cannot sign certificates")
    return ca_key, ca_cert


def make_server_cert(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    hosts: Sequence[str],
    *,
    curve: Curve = "P-256",
    valid_days: int = DEFAULT_VALID_DAYS,
) -> tuple[bytes, bytes]:
    """A TLS server certificate for ``hosts`` (DNS names and/or IP addresses), signed by the CA.

    Returns ``(key_pem, cert_pem)``; the certificate holds only the leaf, and clients trust the CA
    certificate. Validity is capped at the CA's own expiry so the chain never outlives its anchor.
    """
    if isinstance(hosts, str) or not isinstance(hosts, Sequence) or not hosts:
        raise ValueError(f"hosts must be a non-empty sequence of host names, got {hosts!r:.80}")
    sans = [_san_entry(h) for h in hosts]
    if len(set(sans)) != len(sans):
        raise ValueError(f"hosts has duplicates: {list(hosts)!r}")
    ca_key, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    key = _new_key(curve)
    not_before, not_after = _validity(_check_valid_days(valid_days))
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:MAX_COMMON_NAME_CHARS])]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file + os.replace: readers never see a partial file,
    and (mkstemp creates files 0o600) a key is never readable by others, not even briefly."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_test_pki(
    out_dir: str | os.PathLike[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    common_name: str = "fedtune-test-ca",
    valid_days: int = DEFAULT_VALID_DAYS,
) -> TLSFiles:
    """Write a fresh CA certificate and a server certificate + key for ``hosts`` into ``out_dir``.

    The CA key is not written: nothing else can be signed with it later, which is what a test PKI
    (or a single-server deployment) wants. Certificates get mode 0o644, the key 0o600.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_cert = make_ca(common_name, valid_days=valid_days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, valid_days=valid_days)
    files = TLSFiles(
        ca_cert=out / CA_CERT_NAME, server_cert=out / SERVER_CERT_NAME, server_key=out / SERVER_KEY_NAME
    )
    write_atomic(files.server_key, server_key, 0o600)
    write_atomic(files.server_cert, server_cert, 0o644)
    write_atomic(files.ca_cert, ca_cert, 0o644)
    return files


@dataclass(frozen=True)
class NodeKeyFiles:
    """A SuperNode's authentication key pair (OpenSSH format): register ``public``, give ``private`` to it."""

    private: Path
    public: Path


def write_supernode_key(path: str | os.PathLike[str]) -> NodeKeyFiles:
    """Write a fresh EC P-384 key pair for Flower SuperNode authentication: ``path`` and ``path.pub``.

    The same key ``ssh-keygen -t ecdsa -b 384`` makes (OpenSSH formats), which is what
    ``flwr supernode register`` and ``flower-supernode --auth-supernode-private-key`` read.
    """
    private = Path(path)
    private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    files = NodeKeyFiles(private=private, public=private.with_name(private.name + ".pub"))
    write_atomic(files.private, pem, 0o600)
    write_atomic(files.public, public + b" fedtune-supernode\n", 0o644)
    return files
