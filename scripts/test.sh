#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite against the
# real stack. Arguments go to pytest: bash scripts/test.sh -k dlq -x
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest tests --durations=15 "$@"
