"""Long-tail decoding with the online-trained EAGLE drafter vs without speculation, in one engine and one run.

    python benchmarks/spec_decode_long_tail.py --smoke                      # tiny task model, CPU, ~5 minutes
    python benchmarks/spec_decode_long_tail.py --model models/smollm2-135m --data-dir ../shared/data \\
        --prompts gsm8k --dtype bfloat16 --train-prompts 512 --train-s 120  # a real target (GPU)

1. Start one vLLM engine with an EAGLE drafter (freshly initialized) and speculation switched off (K = 0 for every
   batch size, through ``Engine.set_spec_schedule``).
2. Collect the target's own rollouts (sampled at ``--temperature``) for ``--train-prompts`` prompts, take their
   hidden states with transformers, and train the drafter on them for ``--train-s`` seconds with the EAGLE
   objective (``DrafterTrainer``), as the learner does online in ``rl train``. The drafter-step time is reported.
3. Push the drafter into the running engine (in place) and, for each running batch size in ``--batch-sizes`` (the
   long tail: the last few requests of a rollout phase) and each K in ``--ks`` (0 = no speculation), generate
   ``--max-tokens`` tokens for that many held-out prompts, ``--repeats`` times, switching K at run time. Reported
   per (batch size, K): median decode tokens/s, the ratio to K = 0 at the same batch size, and vLLM's acceptance
   counters; and per batch size the best K (what the adaptive policy converges to) and its speed-up.

Every request has ``min_tokens = max_tokens``, so that all K decode the same number of tokens
and the timing is of decoding only. Sampling is lossless with speculation, so the outputs' distribution is the same
for every K (greedy outputs are identical; tests/integration/test_drafter_engine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _prompts(args, tokenizer, n: int, split: str, seed: int) -> list[str]:
    if args.prompts == "arith":
        from rl.data.arith import make_arith_problems

        return [it.prompt for it in make_arith_problems(n, seed, split, "easy")]
    from trainers.evaluation import load_benchmark, make_prompt_formatter, parse_benchmarks

    spec = parse_benchmarks(args.prompts, None)[0]
    items, _ = load_benchmark(spec, make_prompt_formatter(tokenizer)[0], args.data_dir)
    items = items[:n] if split == "train" else items[-n:]
    return [it.prompt for it in items]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="target checkpoint directory (default: the tiny task model)")
    ap.add_argument("--prompts", default="arith", help="arith, or a benchmark name/path (rl eval's --benchmarks)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--k-max", type=int, default=3, help="the engine's num_speculative_tokens")
    ap.add_argument("--ks", default="0,1,2,3")
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--train-s", type=float, default=60.0)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model, short training, few repeats (CPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.train_s, args.train_prompts, args.repeats, args.max_tokens = 30.0, 192, 2, 40
        args.max_model_len, args.enforce_eager, args.gpu_memory_utilization = 256, True, 0.1

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.drafter.buffer import DrafterBuffer
    from rollout.drafter.capture import capture_hidden_states
    from rollout.drafter.checkpoint import save_drafter, weights_for_reload
    from rollout.drafter.model import Drafter
    from rollout.drafter.train import DrafterLossConfig, DrafterTrainer, DrafterTrainerConfig
    from rollout.engine import Engine, GenerationRequest, SamplingSettings

    work = Path(tempfile.mkdtemp(prefix="spec_bench_"))
    model_dir = args.model
    if model_dir is None:
        from trainers.tiny_model import build_tiny_model

        model_dir = str(work / "model")
        build_tiny_model(model_dir, seed=0, eval_problems=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    drafter = Drafter.from_target(target.float() if dtype != torch.float32 else target, seed=0).to(device)
    if dtype != torch.float32:
        target = target.to(dtype)
    drafter_dir = save_drafter(drafter, work / "drafter", dtype=dtype)
    ks = [int(k) for k in args.ks.split(",")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    t0 = time.perf_counter()
    engine = Engine(model_dir, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                    gpu_memory_utilization=args.gpu_memory_utilization,
                    speculative_config={"method": "eagle", "model": str(drafter_dir),
                                        "num_speculative_tokens": args.k_max,
                                        "num_speculative_tokens_per_batch_size": [(1, 1024, 0)]})
    start_s = time.perf_counter() - t0
    engine.set_spec_schedule([(1, 1024, 0)])
    print(f"[bench] engine up in {start_s:.0f} s on {device}", flush=True)

    # 2. the target's own rollouts -> hidden states -> drafter training
    train_prompts = _prompts(args, tokenizer, args.train_prompts, "train", 1)
    reqs = [GenerationRequest(f"t{i}", p, 1, seed=i) for i, p in enumerate(train_prompts)]
    rollouts = [g[0] for g in engine.generate(reqs, SamplingSettings(temperature=args.temperature,
                                                                      max_tokens=args.max_tokens))]
    seqs = capture_hidden_states(target, [r.prompt_token_ids + r.response_token_ids for r in rollouts],
                                 prompt_lengths=[len(r.prompt_token_ids) for r in rollouts], batch_size=16)
    buffer = DrafterBuffer(max_steps=1, max_tokens=10_000_000)
    buffer.add_step(0, seqs)
    trainer = DrafterTrainer(drafter, DrafterTrainerConfig(lr=args.lr, batch_size=args.train_batch, loss=DrafterLossConfig(
        token_weight=1.0, hidden_noise=0.05)))
    from rollout.drafter.online import batch_to

    train = trainer.train(lambda: batch_to(buffer.sample_batch(args.train_batch, trainer.rng), torch.device(device)),
                          time_budget_s=args.train_s)
    step_ms = 1000 * train["drafter/train_s"] / max(train["drafter/steps"], 1)
    print(f"[bench] drafter: {int(train['drafter/steps'])} steps in {train['drafter/train_s']:.0f} s "
          f"({step_ms:.1f} ms/step, batch {args.train_batch}), top-1 agreement "
          f"{train['drafter/top1_agreement']:.3f}, {buffer.num_tokens} tokens", flush=True)
    t0 = time.perf_counter()
    engine.load_drafter_weights(weights_for_reload(drafter, dtype=dtype))
    publish_s = time.perf_counter() - t0

    # 3. long-tail decoding per batch size and K
    eval_prompts = _prompts(args, tokenizer, max(sizes), "test", 7)
    settings = SamplingSettings(temperature=args.temperature, max_tokens=args.max_tokens, min_tokens=args.max_tokens)

    results = []
    for b in sizes:
        for k in ks:
            engine.set_spec_schedule([(1, 1024, k)])
            engine.generate([GenerationRequest("warm", eval_prompts[0], 1, seed=0)], settings)  # warm-up
            engine.spec_decode_delta()
            times, tokens = [], []
            for rep in range(args.repeats):
                reqs = [GenerationRequest(f"e{i}", eval_prompts[i], 1, seed=100 * rep + i) for i in range(b)]
                t = time.perf_counter()
                out = engine.generate(reqs, settings)
                times.append(time.perf_counter() - t)
                tokens.append(sum(len(g[0].response_token_ids) for g in out))
            counters = engine.spec_decode_delta()
            tps = statistics.median(n / s for n, s in zip(tokens, times))
            results.append({"batch_size": b, "k": k, "tokens_per_s": tps, "tokens": sum(tokens),
                            "mean_acceptance_length": counters.mean_acceptance_length if k else 1.0,
                            "acceptance_rate_per_position": counters.acceptance_rate_per_position if k else []})
            print(f"[bench] batch {b:3d} K={k}: {tps:8.1f} tokens/s  acceptance length "
                  f"{results[-1]['mean_acceptance_length']:.2f}", flush=True)

    print("\n| batch size | K | tokens/s | vs K=0 | mean acceptance length |\n|---|---|---|---|---|")
    best = {}
    for r in results:
        base = next(x for x in results if x["batch_size"] == r["batch_size"] and x["k"] == 0)["tokens_per_s"] \
            if 0 in ks else float("nan")
        r["speedup_vs_k0"] = r["tokens_per_s"] / base
        print(f"| {r['batch_size']} | {r['k']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_k0']:.2f}x | "
              f"{r['mean_acceptance_length']:.2f} |")
        if r["batch_size"] not in best or r["tokens_per_s"] > best[r["batch_size"]]["tokens_per_s"]:
            best[r["batch_size"]] = r
    print("\nbest K per batch size (the adaptive policy's target): "
          + ", ".join(f"{b}: K={r['k']} ({r['speedup_vs_k0']:.2f}x)" for b, r in sorted(best.items())))
    summary = {"device": device, "model": model_dir if args.model else "tiny task model", "dtype": args.dtype,
               "engine_start_s": start_s, "drafter_train": {k: v for k, v in train.items()},
               "drafter_step_ms": step_ms, "drafter_publish_s": publish_s, "results": results,
               "args": vars(args), "date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
