#!/usr/bin/env bash
# Start a SuperNode on a device: its own data file, its own state folder, its registered key.
#
#   SUPERLINK=server.example.org:9092 CA=ca.crt KEY=keys/supernode_0 PARTITION=0 \
#   DATA=/data/node0.jsonl STATE=/var/lib/fedtune bash scripts/deploy/supernode.sh
#
# DATA: a json/jsonl/csv/parquet task file with (prompt, answer) or (instruction, response) columns.
# STATE: where the node keeps, between rounds, its verified weights and what it last synced (each
# message runs in a fresh process, so this is what spares a round the full seed replay).
# PARTITION: the node's stable id (seeds its own randomness; distinct per device).
set -euo pipefail
: "${SUPERLINK:?set SUPERLINK=host:port of the SuperLink}"
: "${KEY:?set KEY to the private key of this node (registered with scripts/deploy/connect.sh)}"
: "${DATA:?set DATA to the task file of this node}"
: "${PARTITION:?set PARTITION to the id of this node: 0, 1, ...}"
CA=${CA:-certs/ca.crt}
STATE=${STATE:-$HOME/.cache/fedtune/client-state}
PORT=${CLIENTAPPIO_PORT:-9094}
[[ -f "$DATA" ]] || { echo "DATA=$DATA is not a file" >&2; exit 2; }
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec flower-supernode \
  --superlink "$SUPERLINK" --root-certificates "$CA" --auth-supernode-private-key "$KEY" --port "$PORT" \
  --node-config "partition-id=$PARTITION data-path=\"$DATA\" state-dir=\"$STATE\""
