#!/usr/bin/env bash
# One command for a GPU machine: what works, what is slow, what breaks, in at most 9 minutes.
#
#   bash scripts/gpu_check.sh OUT_DIR [--smoke] [--only stage,...]
#
# Stages, in order of information per minute (GPU time limits in seconds; they sum to 540):
#   env              20  versions, GPU, model runner; the project's modules import without ray/vllm/deepspeed
#   mixed_precision  40  benchmarks/mixed_precision.py: does one step at lr 1e-6 change the weights (bf16 vs fp32 masters)
#   pytest_gpu      125  pytest tests/gpu (Triton kernels, packing backends, FSDP2/DeepSpeed on CUDA)
#   engine          140  scripts/gpu_engine_check.py: runner, bucketed sync, bf16 canary gap, sleep/wake order, drafter
#   lora             90  scripts/gpu_lora_check.py: vLLM's CUDA LoRA path: adapter vs merged-weights gap in bf16, a
#                        second version under a new id, generation through it (a second engine start, with LoRA)
#   fused_logprob    80  benchmarks/fused_logprob.py at H 1536 and 3584, V 151936, T 8k and 32k, with the GEMM floor
#   learner_step     45  benchmarks/learner_step.py: Qwen2.5-1.5B shape, packed + fused vs padded + naive
# (No stage has run on a GPU yet: the limits are estimates. A stage that is cut keeps what it wrote.)
# Each stage runs under its own `timeout`, writes its own log (OUT_DIR/logs/STAGE.log, never piped, so a stopped
# stage keeps it) and its JSON results (OUT_DIR/results/); a stage whose package is missing is skipped, not failed.
# At the end scripts/gpu_check_report.py writes OUT_DIR/report.md and OUT_DIR/report.json. Exit code 0 when every
# stage is ok or skipped.
#
# --smoke: the same stages' CPU variants (tiny shapes; pytest tests/gpu then reports its tests as skipped), under
# 2 minutes. The engine and lora stages are left out of --smoke (a vLLM CPU engine start alone takes 30-110 s on 2
# cores); `--smoke --only engine` (or `lora`) runs one by itself.
#
# It never installs anything: it uses .venv/bin/python when there is one, else python3 on PATH (set GPU_CHECK_PYTHON
# to choose). With vLLM installed outside the image's site-packages, set up its environment first, in the same command.
# Models and caches go to a temporary directory (GPU_CHECK_WORK), not to OUT_DIR.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { echo "usage: bash scripts/gpu_check.sh OUT_DIR [--smoke] [--only stage,...]" >&2; exit 2; }
OUT=""; SMOKE=0; ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --only) shift; [ $# -gt 0 ] || usage; ONLY=$1 ;;
    --only=*) ONLY=${1#--only=} ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || usage
STAGES="env mixed_precision pytest_gpu engine lora fused_logprob learner_step"
for s in ${ONLY//,/ }; do
  case " $STAGES " in *" $s "*) ;; *) echo "unknown stage '$s'; stages: $STAGES" >&2; exit 2 ;; esac
done
mkdir -p "$OUT/logs" "$OUT/results"
OUT=$(cd "$OUT" && pwd)
RES=$OUT/results
: > "$OUT/stages.tsv"

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then PY=$GPU_CHECK_PYTHON
elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python
elif command -v python3 >/dev/null 2>&1; then PY=python3
else PY=python
fi
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 \
  VLLM_ALLOW_INSECURE_SERIALIZATION=1 VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$WORK/vllm-cache} \
  VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} NCCL_DEBUG=${NCCL_DEBUG:-WARN}

has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
if [ "$SMOKE" = 1 ]; then
  MODE=smoke; DEV=cpu
  declare -A LIMIT=([env]=20 [mixed_precision]=35 [pytest_gpu]=35 [engine]=240 [lora]=120 [fused_logprob]=30
                    [learner_step]=30)
else
  MODE=gpu; DEV=cuda
  declare -A LIMIT=([env]=20 [mixed_precision]=40 [pytest_gpu]=125 [engine]=140 [lora]=90 [fused_logprob]=80
                    [learner_step]=45)
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA device visible to $PY: run with --smoke for the CPU variants" >&2
    exit 2
  fi
fi

selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
# the stages that start a vLLM engine: a default --smoke run leaves them out (--smoke --only NAME runs one)
smoke_leaves_out() { [ "$SMOKE" = 1 ] && [ -z "$ONLY" ] && { [ "$1" = engine ] || [ "$1" = lora ]; }; }
SMOKE_ENGINE_REASON="smoke: a vLLM CPU engine start takes 30-110 s on 2 cores, more than the 2-minute budget leaves"
BUDGET=0
for s in $STAGES; do
  if selected "$s" && ! smoke_leaves_out "$s"; then
    BUDGET=$((BUDGET + ${LIMIT[$s]}))
  fi
done
T_START=$SECONDS

gpu_procs() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | wc -l || echo -; }
skip_stage() {  # NAME REASON
  printf '%s\t\t0\t%s\t%s\t-\n' "$1" "${LIMIT[$1]}" "$2" >> "$OUT/stages.tsv"
  echo "[gpu_check] $1: skipped ($2)"
}
run_stage() {  # NAME COMMAND (a bash -c string); the limit is LIMIT[NAME], cut to what the budget has left
  local name=$1 cmd=$2 limit=${LIMIT[$1]} left t0 rc
  left=$((BUDGET - (SECONDS - T_START)))
  if [ "$left" -lt 5 ]; then skip_stage "$name" "the time budget of ${BUDGET} s was spent"; return; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "[gpu_check] $name: running (limit ${limit} s, log logs/$name.log)"
  t0=$SECONDS
  timeout -k 10 "$limit" bash -c "$cmd" > "$OUT/logs/$name.log" 2>&1 < /dev/null
  rc=$?
  printf '%s\t%s\t%s\t%s\t\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" "$(gpu_procs)" >> "$OUT/stages.tsv"
  echo "[gpu_check] $name: exit $rc after $((SECONDS - t0)) s"
}
finish() {
  [ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
  "$PY" scripts/gpu_check_report.py aggregate "$OUT" > "$OUT/logs/report.log" 2>&1
  local rc=$?
  cat "$OUT/report.md" 2>/dev/null || cat "$OUT/logs/report.log"
  [ -z "${GPU_CHECK_WORK:-}" ] && rm -rf "$WORK"
  return $rc
}
trap 'echo "[gpu_check] interrupted: writing the report of what ran"; finish; exit 130' INT TERM

"$PY" - "$OUT/run.json" "$MODE" "$PY" "$BUDGET" <<'EOF'
import datetime, json, socket, subprocess, sys
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
json.dump({"mode": sys.argv[2], "python": sys.argv[3], "limits_sum_s": int(sys.argv[4]), "commit": commit or None,
           "host": socket.gethostname(), "started": datetime.datetime.now().isoformat(timespec="seconds")},
          open(sys.argv[1], "w"))
EOF
if [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -lms 1000 \
    > "$OUT/logs/nvidia_smi.csv" 2>/dev/null &
  SMI=$!
fi

# ---- env
if selected env; then run_stage env "'$PY' scripts/gpu_check_report.py env --json '$RES/env.json'"; fi

# ---- mixed precision
if selected mixed_precision; then
  if [ ! -f benchmarks/mixed_precision.py ]; then skip_stage mixed_precision "benchmarks/mixed_precision.py is not in this checkout"
  else run_stage mixed_precision "'$PY' benchmarks/mixed_precision.py --device $DEV --json '$RES/mixed_precision.json'"
  fi
fi

# ---- pytest tests/gpu (-v: one line per test as it finishes, so a stopped run still has its counts)
if selected pytest_gpu; then
  if ! has pytest; then skip_stage pytest_gpu "pytest is not installed"
  else
    per_test=""; has pytest_timeout && per_test="--timeout $([ "$SMOKE" = 1 ] && echo 30 || echo 90)"
    run_stage pytest_gpu "'$PY' -m pytest tests/gpu -v -ra -p no:cacheprovider $per_test"
  fi
fi

# ---- engine
if selected engine; then
  if ! has vllm; then skip_stage engine "vllm is not importable (install a vLLM build matching this torch)"
  elif smoke_leaves_out engine; then skip_stage engine "$SMOKE_ENGINE_REASON; run --smoke --only engine"
  else
    run_stage engine "'$PY' scripts/gpu_engine_check.py --json '$RES/engine.json' --work '$WORK/engine' $([ "$SMOKE" = 1 ] && echo --smoke)"
  fi
fi

# ---- lora (its own engine, started with LoRA enabled)
if selected lora; then
  if ! has vllm || ! has peft; then skip_stage lora "vllm or peft is not importable"
  elif smoke_leaves_out lora; then skip_stage lora "$SMOKE_ENGINE_REASON; run --smoke --only lora"
  else
    run_stage lora "'$PY' scripts/gpu_lora_check.py --json '$RES/lora.json' --work '$WORK/lora' $([ "$SMOKE" = 1 ] && echo --smoke)"
  fi
fi

# ---- fused log-prob benchmark (one run per hidden size, each with its own JSON, so a stop keeps the first)
if selected fused_logprob; then
  json_ok=0; grep -q -- '"--json"' benchmarks/fused_logprob.py && json_ok=1
  if [ "$SMOKE" = 1 ]; then
    j=""; [ "$json_ok" = 1 ] && j="--json '$RES/fused_logprob.smoke.json'"
    run_stage fused_logprob "'$PY' benchmarks/fused_logprob.py --smoke $j"
  else
    impls=naive,chunked,triton; has liger_kernel && impls=$impls,liger
    cmd="rc=0; for h in 1536 3584; do"
    cmd="$cmd '$PY' benchmarks/fused_logprob.py --hidden \$h --vocab 151936 --tokens 8192,32768 --impls $impls"
    cmd="$cmd --repeats 3 --timeout 45 $([ "$json_ok" = 1 ] && echo "--json '$RES/fused_logprob.h\$h.json'") || rc=1;"
    cmd="$cmd done; exit \$rc"
    run_stage fused_logprob "$cmd"
  fi
fi

# ---- learner step
if selected learner_step; then
  if [ "$SMOKE" = 1 ]; then
    run_stage learner_step "'$PY' benchmarks/learner_step.py --smoke --json '$RES/learner_step.json'"
  else
    run_stage learner_step "'$PY' benchmarks/learner_step.py --num-samples 32 --steps 1 --timeout 32 --json '$RES/learner_step.json'"
  fi
fi

for s in $STAGES; do selected "$s" || skip_stage "$s" "not selected (--only $ONLY)" > /dev/null; done
echo "[gpu_check] stages took $((SECONDS - T_START)) s of a ${BUDGET} s budget"
finish
exit $?
