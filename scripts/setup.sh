#!/usr/bin/env bash
# Everything the pipeline needs, set up on this machine: the Python packages of
# requirements.txt and requirements-test.txt in the virtual environment .venv, and the local stack
# (scripts/stack.sh up). Run again, it only checks.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "Creating the virtual environment .venv"
    "$PYTHON" -m venv "$ROOT/.venv" || {
        echo "Error: $PYTHON cannot create a virtual environment; install it with: sudo apt-get install -y python3-venv" >&2
        exit 1
    }
fi
stamp=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$ROOT/.venv/.requirements.sha256" 2>/dev/null)" != "$stamp" ]; then
    echo "Installing requirements.txt and requirements-test.txt into .venv"
    "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-test.txt"
    echo "$stamp" >"$ROOT/.venv/.requirements.sha256"
fi
bash "$ROOT/scripts/stack.sh" up
