"""Learner step throughput: packed + fused log-probs vs padded + naive, on a random-init Qwen2.5-1.5B-shaped model.

    python benchmarks/learner_step.py                 # H100: bf16 compute, fp32 masters, 64 samples, mean ~2k, max 16k
    python benchmarks/learner_step.py --param-dtype bfloat16          # pure bf16 (no fp32 master weights)
    python benchmarks/learner_step.py --smoke         # a tiny model on CPU, in one process: proves the script runs
    python benchmarks/learner_step.py --smoke --dtype bfloat16        # the same with bf16 autocast on CPU
    python benchmarks/learner_step.py --num-samples 32 --steps 1 --json OUT.json   # shorter; results as JSON too

One ``Learner.train_step`` = old log-prob recompute (a forward pass) + one PPO update (forward + backward) over all
samples, cut into micro-batches of ``--micro-batch-tokens`` (padded tokens count in padded mode, real tokens in
packed mode). Each configuration runs in its own subprocess (fresh model, optimizer and allocator). Sequence lengths
are long-tailed: prompt 64-512 tokens, response log-normal, so that prompt+response has mean ~2k and is capped at
16k (seeded, the same for every configuration).

Precision is a run's default: ``--dtype`` is the compute dtype (``model.dtype``; bfloat16 on CUDA, float32 on CPU)
and ``--param-dtype`` holds the master weights, gradients and AdamW state (``learner.param_dtype``; float32), so
on a GPU the learner keeps fp32 masters and computes in bf16 under autocast. ``--param-dtype bfloat16`` measures
pure bf16 (half the state memory, but AdamW then steps bf16 weights).

Reported: median step time over ``--steps`` after a warm-up step; tokens/s (real prompt+response tokens per step /
step time); MFU = model FLOPs / step time / ``--peak-tflops`` (H100 SXM bf16 dense: 989), where model FLOPs =
4 forward passes' worth (1 for the old log-probs, 3 for forward + backward) of 2 N l + 2 H V l + 2 L H l^2
(causal attention) per sequence of length l, N the non-embedding parameters (gradient-checkpoint recompute and
padding are not counted); peak GPU memory (``max_memory_allocated``) and the allocator's peak reservation
(the learner's ``perf/learner_max_reserved_gib``). ``--json`` writes the same numbers (plus the
policy-loss difference between the two configurations, which compute the same loss) after every configuration, so
a run stopped part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True)
CONFIGS = {
    "padded + naive": {"logprob": "naive", "attention": "padded"},
    "packed + fused": {"logprob": "auto", "attention": "packed"},
}


def make_lengths(n: int, mean: int, cap: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, response) lengths: prompt uniform in [mean/32, mean/4], response log-normal (sigma 1), so that
    prompt + response has mean about ``mean`` and is at most ``cap``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lo, hi = max(1, mean // 32), max(2, mean // 4)
    prompts = rng.integers(lo, hi + 1, n)
    target = max(1.0, mean - prompts.mean())
    sigma = 1.0
    resp = rng.lognormal(math.log(target) - sigma**2 / 2, sigma, n).astype(int)
    resp = np.clip(resp, 1, cap - prompts)
    return [(int(p), int(r)) for p, r in zip(prompts, resp)]


def worker(spec: dict) -> dict:
    import torch

    from rl.algorithms import AlgorithmConfig
    from rl.types import TrainSample
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    cuda = spec["device"] == "cuda"
    torch.manual_seed(0)
    vocab = spec["vocab"]
    g = torch.Generator().manual_seed(1)
    samples = []
    for i, (p, r) in enumerate(spec["lengths"]):
        ids = torch.randint(0, vocab, (p + r,), generator=g).tolist()
        samples.append(TrainSample(ids[:p], ids[p:], [0.0] * r, advantage=float(i % 2) * 2 - 1, group_id=f"g{i // 8}"))
    cfg = LearnerSettings(lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=spec["mbt"],
                          mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner",
                          num_gpus=1 if cuda else 0, torch_threads=spec.get("threads"), kernels=spec["kernels"],
                          activation_checkpointing=spec["grad_ckpt"], param_dtype=spec["param_dtype"])
    try:
        learner = Learner(spec["model_dir"], cfg, AlgorithmConfig(policy_loss="ppo_clip"), temperature=1.0,
                          dtype=spec["dtype"])
        model = learner.model
        n_nonemb = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
        h, layers = model.config.hidden_size, model.config.num_hidden_layers
        fwd = sum(2 * n_nonemb * l + 2 * h * vocab * l + 2 * layers * h * l * l
                  for l in (p + r for p, r in spec["lengths"]))
        learner.train_step(samples)  # warm-up: kernels compile, allocator warms
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, metrics = [], {}
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            metrics = learner.train_step(samples)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return {"ok": True, "step_s": statistics.median(times), "flops": 4 * fwd, "kernels": learner.kernels.describe(),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "reserved_gib": metrics.get("perf/learner_max_reserved_gib") if cuda else None,
                "loss": metrics["loss/policy"], "entropy": metrics["loss/entropy"]}
    except Exception as exc:
        kind = "OOM" if "out of memory" in str(exc).lower() else type(exc).__name__
        return {"ok": False, "error": f"{kind}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}


def run_one(spec: dict, timeout_s: int) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout_s, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout_s} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"worker exit {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny model, short sequences, CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="compute dtype, model.dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="learner.param_dtype: master weights, gradients and AdamW state (default float32, a run's "
                         "default; bfloat16 = pure bf16, needs --dtype bfloat16 on CPU)")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--mean-len", type=int, default=2048)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing (on by default on CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM bf16 dense)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here (after each configuration)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    from trainers.tiny_model import QWEN25_1_5B_SHAPE

    shape = dict(TINY if args.smoke else QWEN25_1_5B_SHAPE)
    if args.smoke:
        args.num_samples, args.mean_len, args.max_len, args.micro_batch_tokens = 12, 48, 256, 512
        args.steps, args.threads = 1, args.threads or 1
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args.param_dtype != "float32" and args.param_dtype != dtype:
        ap.error(f"--param-dtype {args.param_dtype} needs the same compute dtype (--dtype {args.param_dtype}); "
                 "16-bit master weights compute in their own dtype")
    precision = (dtype if args.param_dtype == dtype
                 else f"{dtype} compute, {args.param_dtype} master weights and AdamW state")
    grad_ckpt = device == "cuda" and not args.no_grad_ckpt
    lengths = make_lengths(args.num_samples, args.mean_len, args.max_len, seed=0)
    tokens = sum(p + r for p, r in lengths)
    report = {"device": device, "dtype": dtype, "param_dtype": args.param_dtype,
              "model": "tiny" if args.smoke else "Qwen2.5-1.5B-shaped",
              "num_samples": len(lengths), "tokens": tokens, "max_len": max(p + r for p, r in lengths),
              "micro_batch_tokens": args.micro_batch_tokens, "grad_ckpt": grad_ckpt, "steps": args.steps,
              "peak_tflops": args.peak_tflops, "configs": {}}

    def write_json() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds instead of a minute on the host
            model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(getattr(torch, dtype))
        model.save_pretrained(tmp)
        del model
        where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"# learner step: {where}, {precision}, {'tiny' if args.smoke else 'Qwen2.5-1.5B-shaped'} random model, "
              f"{args.num_samples} samples, {tokens} tokens (mean {tokens / len(lengths):.0f}, max "
              f"{max(p + r for p, r in lengths)}), micro-batch budget {args.micro_batch_tokens}, "
              f"gradient checkpointing {'on' if grad_ckpt else 'off'}, median of {args.steps} step(s)\n")
        print("| config | kernels | step s | tokens/s | MFU | peak GiB | reserved GiB | speed-up | loss/policy | "
              "loss/entropy |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        base = None
        for name, kernels in CONFIGS.items():
            if args.smoke and kernels["logprob"] == "auto":
                kernels = {**kernels, "logprob": "chunked"}  # CPU auto keeps naive for a small vocabulary
            spec = dict(device=device, dtype=dtype, param_dtype=args.param_dtype, model_dir=tmp,
                        vocab=shape["vocab_size"], lengths=lengths,
                        mbt=args.micro_batch_tokens, steps=args.steps, grad_ckpt=grad_ckpt, kernels=kernels,
                        threads=args.threads)
            # --smoke runs in this process: two more interpreter starts would double a smoke run's time
            res = worker(spec) if args.smoke else run_one(spec, args.timeout)
            report["configs"][name] = res
            if not res["ok"]:
                write_json()
                print(f"| {name} | - | - | - | - | - | - | - | {res['error']} | |", flush=True)
                continue
            base = base or res
            res["tokens_per_s"] = tokens / res["step_s"]
            res["mfu"] = res["flops"] / res["step_s"] / (args.peak_tflops * 1e12) if device == "cuda" else None
            ok = [c for c in report["configs"].values() if c["ok"]]
            if len(ok) == 2:
                report["loss_abs_diff"] = abs(ok[0]["loss"] - ok[1]["loss"])
                report["speedup"] = ok[0]["step_s"] / ok[1]["step_s"]
            write_json()
            mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a"
            peak = f"{res['peak_gib']:.1f}" if res["peak_gib"] is not None else "n/a"
            reserved = f"{res['reserved_gib']:.1f}" if res["reserved_gib"] is not None else "n/a"
            print(f"| {name} | {res['kernels']} | {res['step_s']:.2f} | {tokens / res['step_s']:.0f} | {mfu} | {peak} | "
                  f"{reserved} | "
                  f"{base['step_s'] / res['step_s']:.2f}x | {res['loss']:.4f} | {res['entropy']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
