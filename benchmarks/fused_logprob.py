"""Fused linear log-prob/entropy: forward+backward time and peak memory of naive torch, Liger-Kernel's fused
linear cross-entropy (where installed; log-prob only) and ours (chunked torch, Triton).

    python benchmarks/fused_logprob.py                      # H100: V=151936, H in {1536, 3584}, T in {8192, 32768}, bf16
    python benchmarks/fused_logprob.py --smoke              # tiny shapes on CPU: proves the script runs
    python benchmarks/fused_logprob.py --device cpu --dtype float32 --vocab 32000 --hidden 512 --tokens 2048 \\
        --impls naive,chunked --chunk-size auto,256 --threads 1   # the CPU measurement in docs/benchmarks.md

Each (shape, implementation) runs in its own subprocess, so one's out-of-memory failure or allocator state does not
touch the next, and peak memory is that process's own: CUDA ``max_memory_allocated`` above what the inputs held,
CPU peak RSS (``ru_maxrss``) above the RSS after the inputs were built. The measured step is
``sum(g * logp) + sum(e * entropy)`` forward + backward (random g, e), both gradients (hidden and weight);
Liger's loss has no entropy, so it runs ``sum(-nll)`` (log-probs only) on ``hidden / temperature``.

Columns: time and peak memory; ratios against naive measured in the same run; time / GEMM floor. The floor is
measured: the three plain matmuls any implementation needs, [T, H] x [H, V] forward and the two backward GEMMs
(dz [T, V] x W [V, H] and dz^T x h), in the same dtype and process setup (row ``gemm floor``); the last column
also gives the time / 3 x 2 T H V FLOPs at ``--peak-tflops`` (H100 SXM bf16 dense: ~798) on CUDA. A kernel that
does not store the logits recomputes them in backward (4 GEMMs), so its best ratio is ~1.33.

``--json PATH`` writes every row (shape, impl, ms, peak MiB, ratios or the error) and the run's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
ALL_IMPLS = ("naive", "liger", "chunked", "triton")
OUTPUTS = {"naive": "logp+entropy", "liger": "logp only", "chunked": "logp+entropy", "triton": "logp+entropy",
           "gemm": "3 GEMMs"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _loss_fn(impl: str, chunk_size: int | None):
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger(hidden, weight, targets, temperature, g, e):
            return -ce(weight, hidden / temperature, targets)

        return liger
    from trainers.fused_logprob import LOGPROB_KERNELS

    kernel = LOGPROB_KERNELS.get(impl)

    def ours(hidden, weight, targets, temperature, g, e):
        logp, ent = kernel(hidden, weight, targets, temperature, -100, chunk_size)
        return (logp * g).sum() + (ent * e).sum()

    return ours


def worker(spec: dict) -> dict:
    """One measurement in this process; returns the numbers (or the error)."""
    import torch

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t, h, v = spec["tokens"], spec["hidden"], spec["vocab"]
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    try:
        gemm = spec["impl"] == "gemm"
        fn = None if gemm else _loss_fn(spec["impl"], spec.get("chunk_size"))
        torch.manual_seed(0)
        hidden = torch.randn(t, h, device=device, dtype=dtype).requires_grad_(not gemm)
        weight = (torch.randn(v, h, device=device, dtype=dtype) * 0.02).requires_grad_(not gemm)
        targets = torch.randint(0, v, (t,), device=device)
        g = torch.randn(t, device=device)
        e = torch.randn(t, device=device) * 0.01
        dz = torch.randn(t, v, device=device, dtype=dtype) if gemm else None  # counted in the inputs

        def step():
            if gemm:  # the floor: logits forward, dh = dz @ W, dW = dz^T @ h (each output dropped at once)
                for a, b in ((hidden, weight.t()), (dz, weight), (dz.t(), hidden)):
                    torch.mm(a, b)
                return
            hidden.grad = None
            weight.grad = None
            fn(hidden, weight, targets, spec["temperature"], g, e).backward()

        sync()
        base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
        step()  # warm-up (Triton compiles here)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {"ok": True, "ms": 1e3 * statistics.median(times), "peak_mib": (peak - base) / 2**20}
    except Exception as exc:  # an OOM or a missing package is a table entry, not a crash of the whole run
        kind = "OOM" if "out of memory" in str(exc).lower() else type(exc).__name__
        return {"ok": False, "error": f"{kind}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}


def run_one(spec: dict, timeout_s: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout_s} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"worker exit {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def available(impl: str, device: str) -> str | None:
    import importlib.util

    if impl == "liger":
        if device != "cuda":
            return "Liger-Kernel runs on CUDA"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
    if impl == "triton" and (device != "cuda" or importlib.util.find_spec("triton") is None):
        return "Triton kernel runs on CUDA"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (fp32), naive and chunked")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", default="1536,3584", help="comma-separated H values")
    ap.add_argument("--tokens", default="8192,32768", help="comma-separated T values")
    ap.add_argument("--impls", default=",".join(ALL_IMPLS), help=f"comma-separated subset of {ALL_IMPLS}")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--chunk-size", default="auto",
                    help="rows per chunk of `chunked`, comma-separated to compare several (auto: ~128 MiB of logits)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each worker (CPU; 1 gives stable numbers on a shared machine)")
    ap.add_argument("--peak-tflops", type=float, default=798.0,
                    help="for the time / peak-FLOPs ratio on CUDA (H100 SXM bf16 dense)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per measurement")
    ap.add_argument("--no-floor", action="store_true", help="skip the measured GEMM floor")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    if args.smoke:
        args.device, args.dtype = args.device or "cpu", args.dtype or "float32"
        args.vocab, args.hidden, args.tokens, args.repeats = 3001, "64", "128", 2
        args.impls = "naive,chunked" if args.device == "cpu" else args.impls
        args.chunk_size = "32" if args.chunk_size == "auto" else args.chunk_size
        args.threads = args.threads or 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in impls if i not in ALL_IMPLS]
    if bad:
        ap.error(f"unknown --impls {bad}; valid: {', '.join(ALL_IMPLS)}")
    chunks = [None if c.strip() == "auto" else int(c) for c in args.chunk_size.split(",")]
    # (impl, chunk size): the chunked kernel once per requested chunk size.
    runs = [(i, c) for i in impls for c in (chunks if i == "chunked" else [None])]
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# fused log-prob benchmark: {where}, {dtype}, V={args.vocab}, temperature {args.temperature}, "
          f"median of {args.repeats} after a warm-up\n")
    print("| H | T | impl | outputs | fwd+bwd ms | peak MiB | memory vs naive | time vs naive | time / GEMM floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for h in (int(x) for x in args.hidden.split(",")):
        for t in (int(x) for x in args.tokens.split(",")):
            peak_ms = 1e3 * 3 * 2 * t * h * args.vocab / (args.peak_tflops * 1e12)
            naive = floor = None
            for impl, chunk in ([] if args.no_floor else [("gemm", None)]) + runs:
                why = available(impl, device)
                res = {"ok": False, "error": why} if why else run_one(
                    dict(impl=impl, device=device, dtype=dtype, tokens=t, hidden=h, vocab=args.vocab,
                         temperature=args.temperature, chunk_size=chunk, repeats=args.repeats,
                         threads=args.threads), args.timeout)
                name = impl
                if impl == "chunked":
                    from trainers.fused_logprob import auto_chunk_size

                    name = f"chunked ({chunk or auto_chunk_size(args.vocab)} rows/chunk)"
                elif impl == "gemm":
                    name = "gemm floor"
                row = dict(hidden=h, tokens=t, vocab=args.vocab, impl=impl, label=name, outputs=OUTPUTS[impl],
                           chunk_size=chunk if impl == "chunked" else None, **res)
                rows.append(row)
                if not res["ok"]:
                    print(f"| {h} | {t} | {name} | {OUTPUTS[impl]} | - | - | - | - | {res['error']} |", flush=True)
                    continue
                if impl == "naive":
                    naive = res
                if impl == "gemm":
                    floor = res
                row["memory_vs_naive"] = res["peak_mib"] / naive["peak_mib"] if naive and naive["peak_mib"] else None
                row["time_vs_naive"] = res["ms"] / naive["ms"] if naive else None
                row["time_vs_gemm_floor"] = res["ms"] / floor["ms"] if floor else None
                row["time_vs_peak_flops"] = res["ms"] / peak_ms if device == "cuda" else None
                mem = f"{row['memory_vs_naive']:.3f}" if row["memory_vs_naive"] is not None else "-"
                speed = f"{row['time_vs_naive']:.2f}" if row["time_vs_naive"] is not None else "-"
                ratio = f"{row['time_vs_gemm_floor']:.2f}" if row["time_vs_gemm_floor"] is not None else "-"
                if row["time_vs_peak_flops"] is not None:
                    ratio += f" ({row['time_vs_peak_flops']:.2f} x {args.peak_tflops:.0f} TFLOP/s)"
                print(f"| {h} | {t} | {name} | {OUTPUTS[impl]} | {res['ms']:.1f} | {res['peak_mib']:.0f} | {mem} | "
                      f"{speed} | {ratio} |", flush=True)
    if args.json:
        settings = dict(device=device, device_name=where, dtype=dtype, vocab=args.vocab, temperature=args.temperature,
                        repeats=args.repeats, threads=args.threads, peak_tflops=args.peak_tflops,
                        torch=torch.__version__)
        Path(args.json).write_text(json.dumps({"settings": settings, "results": rows}, indent=1) + "\n")
        print(f"\n# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
