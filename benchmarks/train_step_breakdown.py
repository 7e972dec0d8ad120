"""Where an `rl train` step's time goes, per weight transport, on a real model: one short run per transport, same
recipe and seed, and the median of each step's `perf/*` timings over the steps after the first.

    python benchmarks/train_step_breakdown.py --model models/smollm2-135m            # object_store, gloo, ipc
    python benchmarks/train_step_breakdown.py --model models/smollm2-135m --steps 4 --transports object_store ipc

The recipe: GSM8K train prompts with the model's chat template, `--prompts` x `--samples` x `--max-tokens`
(default 4 x 4 x 128), `run.num_steps=--steps`, no evaluation between steps; `ipc` runs colocated (one learner
rank shares its node with the engine: what `sync.transport=auto` picks there), the others disaggregated. The first
transport is the baseline of the ratios. Runs go into `--out` (kept: each has its metrics.jsonl and logs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("perf/step_s", "perf/rollout_s", "perf/learner_wall_s", "perf/weight_sync_s", "perf/weight_load_s",
        "perf/sync_wait_s", "perf/engine_sleep_s", "perf/engine_wake_s")


def run(args, transport: str, out: Path) -> dict[str, float]:
    overrides = [f"run.output_dir={out}", f"model.path={args.model}", "model.build_tiny=false",
                 "data.train.kind=jsonl", "data.train.path=gsm8k_train", "data.train.use_chat_template=true",
                 "data.train.num_problems=400", "data.eval.kind=jsonl", "data.eval.path=gsm8k_test",
                 "data.eval.use_chat_template=true", "data.eval.num_problems=2", "eval.num_samples=1",
                 "eval.every_steps=0", "run.save_every_steps=0", "run.progress=false", f"run.num_steps={args.steps}",
                 f"rollout.prompts_per_step={args.prompts}", f"rollout.num_samples_per_prompt={args.samples}",
                 f"rollout.max_response_tokens={args.max_tokens}", "rollout.max_model_len=1024",
                 "learner.micro_batch_tokens=4096", f"sync.transport={transport}"]
    if transport == "ipc":
        overrides.append("placement.mode=colocated")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainers.cli", "train", "configs/tiny_cpu.yaml", *overrides], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{transport}: rl train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 2]  # step 1 warms up (compilation, first allocations)
    med = {k: statistics.median(r.get(k, 0.0) for r in steps) for k in KEYS}
    med["wall_s"] = time.perf_counter() - t0
    med["steps"] = len(steps)
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory (e.g. from rl convert-gguf)")
    ap.add_argument("--transports", nargs="+", default=["object_store", "gloo", "ipc"],
                    choices=["object_store", "gloo", "ipc"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/step_breakdown"))
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is left out of the medians)")
    results = {}
    for t in args.transports:
        print(f"[bench] rl train with sync.transport={t} ...", flush=True)
        results[t] = run(args, t, args.out / t)
    base = results[args.transports[0]]
    names = [k.removeprefix("perf/") for k in KEYS]
    print(f"\nmedian s per step over steps 2-{args.steps}; ratio to {args.transports[0]} in brackets\n")
    print("| transport | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for t, r in results.items():
        cells = [f"{r[k]:.2f}" + (f" ({r[k] / base[k]:.2f}x)" if base[k] > 0 and k in KEYS[:5] else "") for k in KEYS]
        print(f"| {t} | " + " | ".join(cells) + " |")
    (args.out / "breakdown.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
