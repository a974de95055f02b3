#!/usr/bin/env bash
# Start the SuperLink on the server host: TLS, SuperNode authentication (only registered keys may
# join), and no runtime dependency installation (the hosts already have fedtune's environment).
#
#   CERTS=certs HOST=0.0.0.0 PORT=9092 bash scripts/deploy/superlink.sh
#
# CERTS holds ca.crt, server.pem and server.key (python scripts/make_test_certs.py certs --host <name>).
# One HTTP port serves the SuperNodes (Fleet API), the `flwr` CLI (Control API) and the ServerApp.
set -euo pipefail
CERTS=${CERTS:-certs}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-9092}
DATABASE=${DATABASE:-superlink.db}
for f in ca.crt server.pem server.key; do
  [[ -f "$CERTS/$f" ]] || { echo "missing $CERTS/$f: run python scripts/make_test_certs.py $CERTS --host <this host>" >&2; exit 2; }
done
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
exec flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth --disable-runtime-dependency-installation \
  --host "$HOST" --port "$PORT" --database "$DATABASE"
