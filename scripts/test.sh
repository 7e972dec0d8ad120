#!/usr/bin/env bash
# The tests: unit, integration (real Ray + real vLLM on CPU) and end to end. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
. scripts/env.sh
# Two workers (pytest-xdist), one group of tests at a time each (a file, or the multi-rank files together:
# tests/conftest.py): most of an integration test is start-up that leaves a core idle. RL_TEST_WORKERS=0 runs
# everything in this process.
python -m pytest tests -n "${RL_TEST_WORKERS:-2}" --dist loadfile --durations=30 "$@"  # the slowest, to keep it fast
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
