#!/usr/bin/env bash
# On the operator's machine: write the `flwr` CLI connection to the SuperLink and register every
# SuperNode public key found in KEYS (one key per device; the SuperLink refuses any other).
#
#   SUPERLINK=server.example.org:9092 CA=certs/ca.crt KEYS=keys bash scripts/deploy/connect.sh
#
# Then: flwr run . fedtune-deploy --stream --run-config simulations/default.toml
#       flwr list fedtune-deploy --run-id <id> --format json     # the real status ("finished:completed")
set -euo pipefail
: "${SUPERLINK:?set SUPERLINK=host:port of the SuperLink}"
CA=${CA:-certs/ca.crt}
KEYS=${KEYS:-keys}
NAME=${NAME:-fedtune-deploy}
FLWR_HOME=${FLWR_HOME:-$HOME/.flwr}
export FLWR_HOME FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
mkdir -p "$FLWR_HOME"
CONFIG="$FLWR_HOME/config.toml"
if ! grep -q "^\[superlink\.$NAME\]" "$CONFIG" 2>/dev/null; then
  {
    [[ -s "$CONFIG" ]] || printf '[superlink]\ndefault = "%s"\n\n' "$NAME"
    printf '[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' "$NAME" "$SUPERLINK" "$(realpath "$CA")"
  } >> "$CONFIG"
  echo "added connection $NAME to $CONFIG"
fi
shopt -s nullglob
pubs=("$KEYS"/*.pub)
[[ ${#pubs[@]} -gt 0 ]] || { echo "no *.pub in $KEYS: run python scripts/make_test_certs.py certs --supernode-keys N" >&2; exit 2; }
for pub in "${pubs[@]}"; do
  flwr supernode register "$pub" "$NAME"
done
flwr supernode ls "$NAME"
