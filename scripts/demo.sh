#!/usr/bin/env bash
# The main job on the embedded default: build the tiny model, train it with DAPO for 150 steps (local Ray, real
# vLLM; configs/demo_tiny_cpu.yaml), print the learning curve and where the outputs are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
. scripts/env.sh
OUT=${RL_DEMO_DIR:-runs/demo}
rl train configs/demo_tiny_cpu.yaml run.output_dir="$OUT" "$@"
python -m trainers.report "$OUT"
