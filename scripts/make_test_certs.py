"""Write a test CA and a server certificate (PEM) for fedtune's TLS endpoints.

Usage::

    python scripts/make_test_certs.py certs/ --host localhost --host 127.0.0.1

writes ``certs/ca.crt``, ``certs/server.pem`` and ``certs/server.key`` (mode 0600). Point the split
channel at them with ``[algorithm.options] tls-cert = "certs/server.pem"``, ``tls-key =
"certs/server.key"``, ``tls-ca = "certs/ca.crt"``, or the SuperLink (``scripts/deploy/superlink.sh``;
docs/deployment.md). ``--supernode-keys N`` also writes ``keys/supernode_<i>`` and ``.pub`` (EC
P-384, OpenSSH format) for SuperNode authentication, next to ``out_dir`` (``--keys-dir`` to move
them). The CA's private key is not kept: these are for tests and trials, not for production.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtune.wire.tls import write_supernode_key, write_test_pki


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--host", action="append", default=None, help="a DNS name or IP the server answers on")
    ap.add_argument("--supernode-keys", type=int, default=0, metavar="N", help="also write N SuperNode keys")
    ap.add_argument("--keys-dir", type=Path, help="where SuperNode keys go (default: keys/ beside out_dir)")
    args = ap.parse_args()
    if args.supernode_keys < 0:
        ap.error("--supernode-keys must be >= 0")
    files = write_test_pki(args.out_dir, tuple(args.host or ("localhost", "127.0.0.1")))
    print(f"CA {files.ca_cert}\nserver certificate {files.server_cert}\nserver key {files.server_key}")
    keys_dir = args.keys_dir or args.out_dir.resolve().parent / "keys"
    for i in range(args.supernode_keys):
        key = write_supernode_key(keys_dir / f"supernode_{i}")
        print(f"SuperNode key {key.private} (register {key.public})")


if __name__ == "__main__":
    main()
