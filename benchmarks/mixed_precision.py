"""Does one learner step at a small learning rate move the weights? Pure bf16 against fp32 master weights + bf16
compute, with the project's ``Learner`` (``single`` and ``fsdp2`` on one rank).

    python benchmarks/mixed_precision.py --device cpu                   # tiny model, about 10 s
    python benchmarks/mixed_precision.py --device cuda --json out.json  # a larger random model (~20M) on the GPU

For each strategy and each setting (``fp32``: fp32 parameters and compute; ``pure bf16``: bf16 parameters and AdamW
state, the GPU recipes' old setting; ``fp32 master + bf16 compute``: learner.param_dtype=float32 with
model.dtype=bfloat16) one ``train_step`` at ``--lr`` (1e-6, the recipes' rate) on the same random samples, from the
same random-init Qwen2 checkpoint. Reported: the share of weights whose value changed, the mean |delta w|, the
gradient norm before clipping, the dtypes of the parameters, AdamW moments and exported weights, whether the
gradients were freed after the step, the step's allocator peak (``perf/learner_max_reserved_gib``, 0 on CPU), the
kernels chosen and the step time. At lr 1e-6 a weight of size ~0.02 moves by ~1e-6, far below half of bf16's
spacing there (2^-13 ~ 1.2e-4), so a step on bf16 weights rounds the update away.

Exit code 1 when fp32 master + bf16 compute changes at most ``--min-changed`` (0.9) of the weights under any
strategy, or its exported weights are not bf16.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SHAPES = {  # Qwen2Config fields; head_dim 64 (vLLM's CPU attention needs it, and it is the real models')
    "cpu": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=64, max_position_embeddings=256, tie_word_embeddings=True),
    "cuda": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                 tie_word_embeddings=False),
}
SETTINGS = {  # name -> (learner.param_dtype, model.dtype)
    "fp32": ("float32", "float32"),
    "pure bf16": ("bfloat16", "bfloat16"),
    "fp32 master + bf16 compute": ("float32", "bfloat16"),
}
MIXED = "fp32 master + bf16 compute"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _samples(n: int, vocab: int, max_len: int, seed: int):
    import torch

    from rl.types import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(4, max_len // 4, (1,), generator=g))
        r = int(torch.randint(1, max_len - p, (1,), generator=g))
        out.append(TrainSample(torch.randint(1, vocab, (p,), generator=g).tolist(),
                               torch.randint(1, vocab, (r,), generator=g).tolist(), [-5.0] * r,
                               advantage=float(i % 3) - 1.0, group_id=f"g{i // 4}"))
    return out


def run_one(model_dir: str, device: str, strategy: str, setting: str, lr: float, samples) -> dict:
    import torch
    from safetensors.torch import load as st_load

    from rl.algorithms import AlgorithmConfig
    from trainers import distributed as D
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    param_dtype, compute_dtype = SETTINGS[setting]
    cfg = LearnerSettings(lr=lr, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=4096,
                          mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner",
                          num_gpus=1 if device == "cuda" else 0, strategy=strategy, param_dtype=param_dtype)
    kw = dict(rank=0, world_size=1, master=("127.0.0.1", _free_port())) if strategy == "fsdp2" else {}
    algo = AlgorithmConfig(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean")
    learner = Learner(model_dir, cfg, algo, temperature=1.0, dtype=compute_dtype, **kw)
    try:
        before = {n: D.full_tensor(p.detach()).clone() for n, p in learner.model.named_parameters()}
        t0 = time.perf_counter()
        metrics = learner.train_step(samples)
        step_s = time.perf_counter() - t0
        after = {n: D.full_tensor(p.detach()) for n, p in learner.model.named_parameters()}
        changed = sum(int((after[n] != before[n]).sum()) for n in before)
        total = sum(t.numel() for t in before.values())
        delta = sum(float((after[n].double() - before[n].double()).abs().sum()) for n in before) / total
        moments = {str(v.dtype) for s in learner.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0}
        grads_freed = all(p.grad is None for p in learner.model.parameters())
        exported = st_load(learner.export_weights())
        return dict(
            strategy=strategy, setting=setting, param_dtype=param_dtype, compute_dtype=compute_dtype,
            changed_share=changed / total, mean_abs_delta=delta, grad_norm=metrics["loss/grad_norm"],
            loss=metrics["loss/total"], parameter_dtypes=sorted({str(t.dtype) for t in after.values()}),
            adam_moment_dtypes=sorted(moments), export_dtypes=sorted({str(v.dtype) for v in exported.values()}),
            export_bytes=sum(v.numel() * v.element_size() for v in exported.values()), grads_freed=grads_freed,
            max_reserved_gib=metrics["perf/learner_max_reserved_gib"], kernels=learner.kernels.describe(),
            step_s=step_s, params=total,
        )
    finally:
        del learner
        D.destroy()
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--strategies", default="single,fsdp2", help="comma-separated: single, fsdp2")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--num-samples", type=int, default=None, help="default: 8 on CPU, 16 on CUDA")
    ap.add_argument("--min-changed", type=float, default=0.9, help="the mixed setting must change more than this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("mixed_precision: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    shape = SHAPES[device]
    n = args.num_samples or (8 if device == "cpu" else 16)
    samples = _samples(n, shape["vocab_size"], 48 if device == "cpu" else 512, args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        Qwen2ForCausalLM(Qwen2Config(**shape)).save_pretrained(tmp)  # fp32, initializer_range 0.02
        for strategy in args.strategies.split(","):
            for setting in SETTINGS:
                res = run_one(tmp, device, strategy, setting, args.lr, samples)
                results.append(res)
                print(f"{strategy:6s} {setting:28s} changed {res['changed_share']:8.4%}  mean |dw| "
                      f"{res['mean_abs_delta']:.2e}  grad norm {res['grad_norm']:.4f}  params {res['parameter_dtypes']}"
                      f"  moments {res['adam_moment_dtypes']}  export {res['export_dtypes']}  grads freed "
                      f"{res['grads_freed']}  max reserved {res['max_reserved_gib']:.2f} GiB  {res['step_s']:.2f} s",
                      flush=True)
    failures = [f"{r['strategy']}: {MIXED} changed {r['changed_share']:.2%} of the weights (<= {args.min_changed:.0%})"
                for r in results if r["setting"] == MIXED and r["changed_share"] <= args.min_changed]
    failures += [f"{r['strategy']}: {MIXED} exported {r['export_dtypes']}, not bfloat16" for r in results
                 if r["setting"] == MIXED and r["export_dtypes"] != ["torch.bfloat16"]]
    summary = dict(device=device, gpu=torch.cuda.get_device_name() if device == "cuda" else None, lr=args.lr,
                   num_samples=n, shape=shape, results=results, ok=not failures, failures=failures)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print("mixed_precision: " + ("OK" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
