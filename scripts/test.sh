#!/usr/bin/env bash
# The tests: unit, integration (real Ray + real vLLM on CPU) and end to end. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
. scripts/env.sh
python -m pytest tests --durations=30 "$@"  # the slowest tests, for keeping the suite fast
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
