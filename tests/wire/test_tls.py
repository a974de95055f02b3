"""Test PKI: the chain verifies (path validation with host name matching), SANs, file modes."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedtune.wire.tls import make_ca, make_server_cert, write_test_pki


def _verify(ca_pem: bytes, cert_pem: bytes, host: str) -> None:
    leaf = x509.load_pem_x509_certificate(cert_pem)
    try:
        subject: x509.DNSName | x509.IPAddress = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = (
        PolicyBuilder().store(Store([x509.load_pem_x509_certificate(ca_pem)])).build_server_verifier(subject)
    )
    verifier.verify(leaf, [])


def test_server_cert_verifies_against_its_ca_for_every_host() -> None:
    ca_key, ca_cert = make_ca("unit-ca")
    _, cert_pem = make_server_cert(ca_key, ca_cert, ["localhost", "127.0.0.1", "::1"])
    for host in ("localhost", "127.0.0.1", "::1"):
        _verify(ca_cert, cert_pem, host)
    with pytest.raises(VerificationError):
        _verify(ca_cert, cert_pem, "example.org")  # not in the SAN
    _, other_ca = make_ca("other-ca")
    with pytest.raises(VerificationError):
        _verify(other_ca, cert_pem, "localhost")


def test_signature_issuer_sans_and_key_types() -> None:
    ca_key_pem, ca_cert_pem = make_ca("unit-ca", curve="P-384")
    key_pem, cert_pem = make_server_cert(ca_key_pem, ca_cert_pem, ["localhost", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    leaf = x509.load_pem_x509_certificate(cert_pem)
    assert leaf.issuer == ca.subject
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    assert leaf.signature_hash_algorithm is not None
    ca_public.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca_public.curve, ec.SECP384R1)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert b"BEGIN PRIVATE KEY" in key_pem
    days = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    assert 360 <= days <= 366


@pytest.mark.parametrize("hosts", [[], "localhost", [""], ["local host"], ["a", "a"]])
def test_bad_hosts_are_refused(hosts: object) -> None:
    ca_key, ca_cert = make_ca("unit-ca")
    with pytest.raises(ValueError, match="host"):
        make_server_cert(ca_key, ca_cert, hosts)  # type: ignore[arg-type]


def test_mismatched_ca_pair_is_refused() -> None:
    ca_key, _ = make_ca("a")
    _, other_cert = make_ca("b")
    with pytest.raises(ValueError, match="does not belong"):
        make_server_cert(ca_key, other_cert, ["localhost"])


def test_write_test_pki_files_and_modes(tmp_path: Path) -> None:
    files = write_test_pki(tmp_path / "certs", ["localhost", "127.0.0.1"])
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.server_cert.stat().st_mode) == 0o644
    _verify(files.ca_cert.read_bytes(), files.server_cert.read_bytes(), "127.0.0.1")
    assert sorted(p.name for p in files.ca_cert.parent.iterdir()) == ["ca.crt", "server.key", "server.pem"]
    first_key = files.server_key.read_bytes()
    again = write_test_pki(tmp_path / "certs")  # overwrites in place (os.replace), no temp files left
    assert again == files and again.server_key.read_bytes() != first_key
    assert sorted(p.name for p in files.ca_cert.parent.iterdir()) == ["ca.crt", "server.key", "server.pem"]


def test_supernode_key_is_an_openssh_p384_pair_with_private_mode(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedtune.wire.tls import write_supernode_key

    files = write_supernode_key(tmp_path / "keys" / "supernode_0")
    private = load_ssh_private_key(files.private.read_bytes(), password=None)
    public = load_ssh_public_key(files.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert stat.S_IMODE(files.private.stat().st_mode) == 0o600
    assert files.public.name == "supernode_0.pub"
