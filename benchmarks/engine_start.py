"""Engine start-up and generation by engine mode, same run: compiled or eager, vLLM's core in its own process or
in the engine actor's (``rollout.enforce_eager``, ``rollout.engine_core``).

    python benchmarks/engine_start.py --model <dir>     # a transformers checkpoint, e.g. a tiny model's folder
    python benchmarks/engine_start.py                   # builds a small tiny model first (a minute)
    python benchmarks/engine_start.py --json out.json

Each mode starts one ``rollout.engine.Engine`` as a Ray actor, as ``rl train`` does, and reports: the actor's time
to ready (a fresh worker process, its imports, vLLM's start-up), vLLM's own start-up (``Engine.start_s``), and the
best of ``--repeats`` generations of ``--prompts`` prompts x ``--samples`` samples x ``--max-tokens`` tokens (all
of them, ``min_tokens`` = ``max_tokens``). The modes run one after another on the same machine, the baseline
(vLLM's default: compiled, core in its own process) first; the ratios are against it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MODES = [  # (name, enforce_eager, engine_core); the first is the baseline
    ("compiled, own process", False, "process"),
    ("compiled, in-process", False, "in_process"),
    ("eager, own process", True, "process"),
    ("eager, in-process", True, "in_process"),
]


def measure(model: str, eager: bool, core: str, args) -> dict:
    import ray

    from rollout.engine import Engine, GenerationRequest, SamplingSettings

    t0 = time.perf_counter()
    engine = ray.remote(Engine).options(num_cpus=1).remote(model, seed=0, max_model_len=256, enforce_eager=eager,
                                                           engine_core=core)
    ray.get(engine.ping.remote())
    ready_s = time.perf_counter() - t0
    start_s = ray.get(engine.__ray_call__.remote(lambda self: self.start_s))
    mode = ray.get(engine.engine_mode.remote())
    assert (mode["eager"], mode["in_process"]) == (eager, core == "in_process"), mode
    reqs = [GenerationRequest(f"p{i}", f"Compute {i} + {2 * i}.", args.samples, seed=i) for i in range(args.prompts)]
    settings = SamplingSettings(temperature=1.0, max_tokens=args.max_tokens, min_tokens=args.max_tokens)
    times, tokens = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        groups = ray.get(engine.generate.remote(reqs, settings))
        times.append(time.perf_counter() - t)
        tokens = [r.response_token_ids for g in groups for r in g]
    ray.kill(engine)
    return {"ready_s": ready_s, "vllm_start_s": start_s, "generate_s": min(times), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a transformers checkpoint (default: build a small tiny model)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    import ray

    model = args.model
    if model is None:
        from trainers.tiny_model import build_tiny_model

        model = tempfile.mkdtemp(prefix="engine_start_")
        build_tiny_model(model, seed=0, sft_steps=30, eval_problems=0)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    rows = []
    for name, eager, core in MODES:
        r = measure(model, eager, core, args)
        rows.append({"mode": name, "enforce_eager": eager, "engine_core": core, **r})
        print(f"[bench] {name}: ready in {r['ready_s']:.1f} s (vLLM {r['vllm_start_s']:.1f} s), generation "
              f"{r['generate_s']:.3f} s", flush=True)
    ray.shutdown()
    base = rows[0]
    same = all(r["tokens"] == base["tokens"] for r in rows)
    print("\n| mode | ready (s) | vLLM start (s) | generation (s) | ready vs baseline | generation vs baseline |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['ready_s']:.1f} | {r['vllm_start_s']:.1f} | {r['generate_s']:.3f} | "
              f"{r['ready_s'] / base['ready_s']:.2f}x | {r['generate_s'] / base['generate_s']:.2f}x |")
    print(f"\nsame tokens in every mode: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
                                               "same_tokens": same, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
