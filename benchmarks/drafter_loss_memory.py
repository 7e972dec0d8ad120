"""Drafter training step at a real vocabulary: plain autograd vs the chunked token loss, same run.

    python benchmarks/drafter_loss_memory.py            # CPU: a Qwen2.5-1.5B-shaped drafter, 8 x 256 tokens
    python benchmarks/drafter_loss_memory.py --smoke    # a small shape: proves the script runs
    python benchmarks/drafter_loss_memory.py --device cuda --seqs 16 --seq-len 1024   # GPU machine

The drafter's token loss needs the fp32 logits of every counted position over the whole vocabulary, for the
drafter's guess and for the target's distribution (152k x 4 bytes = 0.6 MB per position at Qwen2.5's vocabulary).
The baseline is the objective written with plain autograd (``autograd``: the logits, their log-softmax and the
target's softmax of all positions stay alive for the backward). ``rollout.drafter.train.drafter_loss`` forms the
token loss and its gradient chunk by chunk in the forward: with ``chunk_bytes=0`` in one chunk, with the default
(128 MiB) in chunks of that many bytes of logits. Each setting runs in a fresh process: a warm-up step, then
``--repeats`` steps (forward, backward, AdamW) on the same batch. Reported: median step time, and the peak memory
of the steps above the level before them (CPU: the process's peak resident set; CUDA: ``max_memory_allocated``).
The settings' losses before any update are compared (they must agree; later steps drift apart by rounding).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         intermediate_size=8960, vocab_size=151936),
    "small": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  intermediate_size=512, vocab_size=32000),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def autograd_loss(drafter, batch):
    """The objective (feature weight 1, token weight 1, soft labels) with plain autograd, all positions at once."""
    import torch
    import torch.nn.functional as F

    ids, hidden = batch.input_ids, batch.hidden_states.float()
    t = ids.shape[1]
    counted = (torch.arange(t - 1, device=ids.device)[None] + 1 < batch.lengths[:, None]) & batch.loss_mask[:, 1:]
    f, target = drafter(ids[:, 1:], hidden[:, :-1])[counted], hidden[:, 1:][counted]
    logp = F.log_softmax(drafter.logits(f).float(), dim=-1)
    with torch.no_grad():
        q = F.softmax(drafter.logits(target).float(), dim=-1)
    return F.smooth_l1_loss(f, target) - (q * logp).sum(-1).mean()


def run_setting(args, setting: tuple[str, int], queue) -> None:
    """One setting (implementation, chunk_bytes) in this (fresh) process; puts its result on ``queue``."""
    import torch

    from rollout.drafter.buffer import DrafterBatch
    from rollout.drafter.model import Drafter, DrafterConfig
    from rollout.drafter.train import DrafterLossConfig, DrafterTrainer, DrafterTrainerConfig

    impl, chunk_bytes = setting

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = DrafterConfig(**SHAPES[args.shape], rope_theta=1e6, rms_norm_eps=1e-6,
                        max_position_embeddings=max(4096, args.seq_len))
    drafter = Drafter(cfg)
    with torch.no_grad():  # a peaked target distribution, like a trained model's
        drafter.lm_head.weight.normal_(0.0, 0.5)
    drafter = drafter.to(device)
    trainer = DrafterTrainer(drafter, DrafterTrainerConfig(loss=DrafterLossConfig(token_weight=1.0,
                                                                                  chunk_bytes=chunk_bytes)))
    g = torch.Generator().manual_seed(1)
    b, t, h = args.seqs, args.seq_len, cfg.hidden_size
    batch = DrafterBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (b, t), generator=g).to(device),
        hidden_states=torch.randn(b, t, h, generator=g).to(device),
        lengths=torch.full((b,), t, dtype=torch.long).to(device),
        loss_mask=torch.ones(b, t, dtype=torch.bool).to(device),
    )

    def step() -> float:
        if impl == "fused":
            return trainer.step(batch)["drafter/loss"]
        drafter.train()
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = autograd_loss(drafter, batch)
        loss.backward()
        trainer.optimizer.step()
        return loss.item()

    first = step()  # warm-up (allocates the optimizer state); the loss before any update
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times, losses = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:  # ru_maxrss is in KiB on Linux; the warm-up step reached the same peak, so this is the steps' peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    queue.put({"impl": impl, "chunk_bytes": chunk_bytes, "first_loss": first, "step_s": statistics.median(times), "peak_mib": peak / 2**20,
               "losses": losses, "positions": b * (t - 1)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-mb", type=float, default=128.0, help="the chunked setting's chunk_bytes, in MiB")
    ap.add_argument("--smoke", action="store_true", help="small shape, 2 x 64 tokens, 1 repeat")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.smoke:
        args.shape, args.seqs, args.seq_len, args.repeats, args.chunk_mb = "small", 2, 64, 1, 2.0

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = []
    for setting in (("autograd", 0), ("fused", 0), ("fused", int(args.chunk_mb * 2**20))):
        queue = ctx.Queue()
        proc = ctx.Process(target=run_setting, args=(args, setting, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"the setting {setting} failed (exit code {proc.exitcode})")
    whole = results[0]
    diff = max(abs(r["first_loss"] - whole["first_loss"]) for r in results[1:])
    print(f"drafter {args.shape}, {args.seqs} x {args.seq_len} tokens ({whole['positions']} positions), "
          f"{args.device}, median of {args.repeats} steps")
    print("| token loss | step | peak memory above the steps' start | vs plain autograd: time, memory |")
    print("|---|---|---|---|")
    for r in results:
        name = ("plain autograd, all positions" if r["impl"] == "autograd" else "drafter_loss, "
                + ("one chunk" if r["chunk_bytes"] == 0 else f"chunks of {r['chunk_bytes'] / 2**20:g} MiB"))
        print(f"| {name} | {r['step_s']:.2f} s | {r['peak_mib']:.0f} MiB | "
              f"{r['step_s'] / whole['step_s']:.2f}x, {r['peak_mib'] / max(whole['peak_mib'], 1e-9):.2f}x |")
    print(f"loss before any update: {whole['first_loss']:.4f}; largest difference between the settings: {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "loss_max_abs_diff": diff}, indent=2))
    if diff > 1e-3 * max(abs(whole["first_loss"]), 1.0):
        raise SystemExit(f"the settings' losses differ by {diff}")


if __name__ == "__main__":
    main()
