"""One GPU, colocated: the learner (FSDP2, one rank) and one vLLM engine share the device; per step the engine
sleeps while the learner trains, wakes its weights for the sync, then its KV cache.

    python benchmarks/colocated_step.py                  # GPU: random-init Qwen2.5-1.5B-shaped model, bf16, sleep level 2
    python benchmarks/colocated_step.py --smoke          # CPU: a tiny shape, proves the script and the run path work

On a GPU node without Ray (torch and vLLM installed), bring Ray and the graders with ``scripts/gpu_site.sh`` first
(docs/cluster.md): ``source .gpu-rl/bin/stage.sh && python3 benchmarks/colocated_step.py --work-dir /tmp/cs``.

It builds a random-init model of the chosen shape with a small tokenizer trained on the arithmetic task (the
embedding keeps the full vocabulary size, so the LM head costs what it costs in the real model), then runs
``rl train`` on ``configs/cluster_1gpu_qwen2.5_math_1.5b.yaml`` with the arithmetic task (no data files needed) for
``--steps`` steps, and reads the run's metrics. Random weights rarely stop early, so responses run to
``--response-tokens``; rewards are ~0 and the update is not the point.

Reported per step (the first step includes compilation and warm-up; the summary takes the median of the rest):
engine sleep and wake time, weight sync time (learner gather + serialize + transfer + engine load) and the
engine-side load alone, bytes synced, learner tokens/s and wall time, rollout tokens/s, and the canary (the
largest difference between the engine's and the learner's log-probs on a fixed probe after each sync).
The JSON goes to ``--out`` (default: ``<work-dir>/colocated_step.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

RECIPE = "configs/cluster_1gpu_qwen2.5_math_1.5b.yaml"
# Head dim 64 and 2 KV heads: what vLLM's CPU attention takes.
TINY = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True,
            use_sliding_window=False)
REPORTED = {
    "perf/engine_sleep_s": "engine sleep (s)",
    "perf/engine_wake_s": "engine wake, weights + KV cache (s)",
    "perf/weight_sync_s": "weight sync, gather + push (s)",
    "perf/weight_load_s": "of which engine-side load (s)",
    "sync/bytes": "bytes synced",
    "perf/learner_tokens_per_s": "learner tokens/s",
    "perf/learner_wall_s": "learner wall (s)",
    "perf/rollout_tokens_per_s": "rollout tokens/s",
    "perf/step_s": "step (s)",
    "sync/canary_max_abs_diff": "canary max |logp diff|",
}


def overrides(args, model_dir: Path, run_dir: Path) -> list[str]:
    out = [
        f"model.path={model_dir}", "model.build_tiny=false", f"model.dtype={args.dtype}",
        f"run.output_dir={run_dir}", f"run.num_steps={args.steps}", "run.save_every_steps=0", "run.progress=false",
        "data.train={kind: arith, split: train, num_problems: 2000, seed: 1000}",
        "data.eval={kind: arith, split: test, num_problems: 8, seed: 1}",
        "eval.every_steps=0", "eval.num_samples=1",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.num_samples_per_prompt={args.samples}",
        f"rollout.max_response_tokens={args.response_tokens}",
        f"rollout.max_model_len={args.response_tokens + 256}",
        f"placement.engine_sleep_level={args.sleep_level}",
        f"learner.micro_batch_tokens={args.micro_batch_tokens}",
        "learner.mini_batches_per_step=1",
    ]
    if args.smoke:  # the same recipe, moved to the CPU
        out += ["learner.num_gpus=0", "rollout.num_gpus_per_engine=0", "learner.num_cpus=1",
                "rollout.num_cpus_per_engine=1", "rollout.gpu_memory_utilization=0.1", "learner.torch_threads=1",
                "learner.activation_checkpointing=false", "reward_pool.num_workers=1"]
    return out + list(args.override)


def read_steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) > 0]


def summarize(rows: list[dict]) -> dict[str, float]:
    """Median over the steps after the first (all steps when there is only one)."""
    later = rows[1:] or rows
    return {k: statistics.median(r[k] for r in later) for k in REPORTED if all(k in r for r in later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--response-tokens", type=int, default=1024)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--sleep-level", type=int, default=2, choices=[0, 1, 2])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the model and the run here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("override", nargs="*", help="more `rl train` overrides, key=value")
    args = ap.parse_args()
    if args.smoke:
        args.dtype = "float32"
        args.steps, args.prompts, args.samples = min(args.steps, 3), min(args.prompts, 2), min(args.samples, 2)
        args.response_tokens, args.micro_batch_tokens = min(args.response_tokens, 16), min(args.micro_batch_tokens, 1024)
    from trainers.tiny_model import QWEN25_1_5B_SHAPE, build_random_model

    shape = TINY if args.smoke else QWEN25_1_5B_SHAPE
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="colocated_step_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, run_dir = work / "model", work / "run"
    info = {}
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        info = {"num_params": build_random_model(model_dir, shape, args.dtype), "build_s": time.perf_counter() - t0}
    print(f"[bench] model: {info or 'reused'} in {model_dir}", flush=True)

    cmd = [sys.executable, "-m", "trainers.cli", "train", RECIPE, *overrides(args, model_dir, run_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    rows = read_steps(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    result = {"shape": shape, "dtype": args.dtype, "sleep_level": args.sleep_level, "steps": len(rows),
              "prompts": args.prompts, "samples": args.samples, "response_tokens": args.response_tokens,
              "rl_train_rc": proc.returncode, "rl_train_wall_s": wall, **info,
              "per_step": [{k: r[k] for k in REPORTED if k in r} for r in rows], "median_after_first": summarize(rows)}
    out = args.out or work / "colocated_step.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\n| metric | step 1 | median of steps 2-{len(rows)} |\n|---|---|---|")
    for key, label in REPORTED.items():
        if rows and key in rows[0]:
            later = result["median_after_first"].get(key, float("nan"))
            print(f"| {label} | {rows[0][key]:.4g} | {later:.4g} |")
    print(f"\n[bench] rl train exit {proc.returncode}, {wall:.0f} s; JSON: {out}", flush=True)
    if proc.returncode != 0 or len(rows) != args.steps:
        sys.exit(f"rl train failed (exit {proc.returncode}) or logged {len(rows)} of {args.steps} steps")


if __name__ == "__main__":
    main()
