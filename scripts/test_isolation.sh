#!/usr/bin/env bash
# Shows that no test relies on another: runs each test alone, one pytest each, then the
# whole suite in an order drawn at random from SEED (default: today's date).
#   bash scripts/test_isolation.sh [SEED]
# Prints the tests that failed alone; exits 1 if any test failed either way.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SEED=${1:-$(date +%Y%m%d)}
bash "$ROOT/scripts/setup.sh" || exit 1
cd "$ROOT"
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)

mapfile -t TESTS < <("${PYTEST[@]}" --collect-only tests | grep '::')
failed=()
for test in "${TESTS[@]}"; do
    "${PYTEST[@]}" "$test" >/dev/null 2>&1 || failed+=("$test")
done
echo "Alone: $((${#TESTS[@]} - ${#failed[@]})) of ${#TESTS[@]} tests passed"
for test in "${failed[@]}"; do echo "  failed alone: $test"; done

echo "In random order (--shuffle $SEED):"
"${PYTEST[@]}" tests --shuffle "$SEED" | tail -n 1
shuffled=${PIPESTATUS[0]}
[ "${#failed[@]}" = 0 ] && [ "$shuffled" = 0 ]
