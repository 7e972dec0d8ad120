"""Weight sync learner -> engine: object store vs the gloo and ipc transports, whole model vs buckets, same run.

    python benchmarks/weight_sync.py                   # CPU: a 156M-parameter Qwen2 shape in fp32 (0.62 GB)
    python benchmarks/weight_sync.py --smoke           # a tiny shape: proves the script runs
    python benchmarks/weight_sync.py --shape qwen2.5-1.5b --dtype bfloat16 --gpu --transports object_store  # GPU
    python benchmarks/weight_sync.py --shape qwen2.5-1.5b --dtype bfloat16 --param-dtype bfloat16 --gpu \
        --transports object_store  # pure bf16

One learner actor (single strategy) and one vLLM engine actor on local Ray per weight-transfer transport (an
engine starts with one backend; the object store shares the first pair); ``trainers.sync.push_weights``
(``sync.transport=object_store``) and ``trainers.sync.push_weights_transfer`` (``gloo``; ``ipc`` with its handoff) do the
sync exactly as ``rl train`` does, with ``--buckets-mb`` (0: one piece). Each (bucket size, transport) runs ``--repeats``
syncs after a warm-up sync; the transports take turns within each repeat, so drift on a shared machine hits both
alike. Reported per setting: median sync time, the engine's own loading time (object store: the whole
``collective_rpc`` of the bytes, deserialization and reload; gloo: ``load_weights`` of the received views plus the
finish), and the learner process's peak resident memory above its level before the sync (sampled every 2 ms
during the syncs). After every sync the engine's log-probs on a probe are compared with the learner's (mean and
max |diff|, against the run's default canary bounds for the dtype, ``rl.config_runtime.CANARY_BOUNDS``).

Precision is a run's default: ``--dtype`` is ``model.dtype``, the learner's compute dtype and the engine's weights
dtype; the learner holds fp32 master weights (``--param-dtype``, ``learner.param_dtype``: float32) and the export
casts them to ``--dtype`` on the learner's device before the gather, so a bf16 sync moves bf16 bytes either way.
``--param-dtype bfloat16`` measures pure bf16 (the learner holds bf16 weights; needs ``--dtype bfloat16``).
On a GPU machine (``--gpu``: learner and engines share one GPU) pass ``--transports object_store ipc``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rl.config_runtime import CANARY_BOUNDS  # noqa: E402
from trainers.tiny_model import QWEN25_1_5B_SHAPE, build_random_model  # noqa: E402

SHAPES = {
    # head dim 64 (vLLM's CPU attention), untied head: the LM head and the embedding are separate buckets
    "cpu-156m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
                     max_position_embeddings=512),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                 max_position_embeddings=512),
    "qwen2.5-1.5b": {**QWEN25_1_5B_SHAPE, "max_position_embeddings": 512},
}


def _rss_sampler():
    """Start sampling this process's RSS every 2 ms; the returned function stops and gives (start, peak)."""
    import threading

    import psutil

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    stop = threading.Event()

    def run():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def finish():
        stop.set()
        thread.join()
        return start, max(peak[0], proc.memory_info().rss)

    return finish


def run_all(model_dir: str, args) -> list[dict]:
    """Every (bucket size, transport) setting against one learner and one engine; one row per setting."""
    import gc

    import ray

    from trainers.sync import LearnerGroup, init_weight_transfer, push_weights, push_weights_transfer
    from rl.algorithms import AlgorithmConfig
    from rollout.engine import Engine
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    class MeasuredLearner(Learner):
        def rss_start(self):
            gc.collect()
            self._finish = _rss_sampler()

        def rss_stop(self):
            start, peak = self._finish()
            return peak - start

        def perturb(self, scale: float):
            import torch

            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(1.0 + scale)

    gpus = 1 if args.gpu else 0
    cfg = LearnerSettings(lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=4096,
                          mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=gpus,
                          param_dtype=args.param_dtype)
    # one (engine, learner) pair per weight-transfer transport (an engine has one backend); the object store
    # reaches any engine, so it shares the first pair
    backend = {"gloo": "gloo", "ipc": "rl_ipc"}
    pairs = {}
    for t in [t for t in args.transports if t in backend] or ["object_store"]:
        engine = ray.remote(Engine).options(num_cpus=1, num_gpus=0.5 if gpus else 0).remote(
            model_dir, dtype=args.dtype, max_model_len=256, gpu_memory_utilization=args.gpu_memory_utilization,
            weight_transfer=backend.get(t))
        ray.get(engine.ping.remote())
        learner = ray.remote(MeasuredLearner).options(num_cpus=1, num_gpus=0.5 if gpus else 0).remote(
            model_dir, cfg, AlgorithmConfig(policy_loss="ppo_clip"), temperature=1.0, dtype=args.dtype,
            export_dtype=args.dtype)
        ray.get(learner.ping.remote())
        group = LearnerGroup([learner])
        if t in backend:
            init_weight_transfer(group, [engine], 1, timeout_s=600.0, transport=t)
        pairs[t] = (group, learner, engine)
    pairs.setdefault("object_store", next(iter(pairs.values())))
    push = {"object_store": push_weights, "gloo": push_weights_transfer,
            "ipc": lambda *a: push_weights_transfer(*a, handoff=True)}
    probe = [([5, 6, 7, 8], [9, 10, 11, 12])]
    version = 0
    rows = []
    for bucket_mb in args.buckets_mb:
        bucket_bytes = int(bucket_mb * 2**20)
        runs: dict[str, list[dict]] = {t: [] for t in args.transports}
        for t in args.transports:  # warm-up
            version += 1
            push[t](pairs[t][0], [pairs[t][2]], version, bucket_bytes)
        for _ in range(args.repeats):
            for t in args.transports:
                group, learner, engine = pairs[t]
                ray.get(learner.perturb.remote(1e-2))  # new weights each time: a sync that loads nothing is caught
                version += 1
                ray.get(learner.rss_start.remote())
                out = push[t](group, [engine], version, bucket_bytes)
                out["learner_rss_peak_mb"] = ray.get(learner.rss_stop.remote()) / 2**20
                want = ray.get(learner.probe_logprobs.remote(probe))
                got = ray.get(engine.score_tokens.remote(probe))
                diffs = [abs(a - b) for w, g in zip(want, got) for a, b in zip(w, g)]
                out["canary_mean_abs_diff"], out["canary_max_abs_diff"] = sum(diffs) / len(diffs), max(diffs)
                runs[t].append(out)
        for t, outs in runs.items():
            med = {k: statistics.median(r[k] for r in outs) for k in outs[0]}
            rows.append({"transport": t, "bucket_mb": bucket_mb, "buckets": int(outs[0]["sync/buckets"]),
                         "bytes": outs[0]["sync/bytes"], "sync_s": med["perf/weight_sync_s"],
                         "sync_s_all": [r["perf/weight_sync_s"] for r in outs],
                         "engine_load_s": med["perf/weight_load_s"],
                         "learner_rss_peak_mb": med["learner_rss_peak_mb"],
                         "canary_mean_abs_diff": max(r["canary_mean_abs_diff"] for r in outs),
                         "canary_max_abs_diff": max(r["canary_max_abs_diff"] for r in outs)})
    for _, learner, engine in {id(v[1]): v for v in pairs.values()}.values():
        ray.kill(engine)
        ray.kill(learner)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu-156m")
    ap.add_argument("--smoke", action="store_true", help="the tiny shape, 2 repeats")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="model.dtype: the learner's compute dtype and the engine's weights")
    ap.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="learner.param_dtype: the learner's master weights (default float32, a run's default; "
                         "bfloat16 = pure bf16, needs --dtype bfloat16)")
    ap.add_argument("--gpu", action="store_true", help="learner and engine share one GPU")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.15)
    ap.add_argument("--buckets-mb", type=float, nargs="+", default=[0, 64])
    ap.add_argument("--transports", nargs="+", default=["object_store", "gloo", "ipc"],
                    choices=["object_store", "gloo", "ipc"],
                    help="the first is the baseline of the ratios")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = ap.parse_args()
    if args.param_dtype != "float32" and args.param_dtype != args.dtype:
        ap.error(f"--param-dtype {args.param_dtype} needs --dtype {args.param_dtype}: 16-bit master weights compute "
                 "in their own dtype")
    if args.smoke:
        args.shape, args.repeats, args.buckets_mb = "tiny", 2, [0, 0.05]
    import ray

    with tempfile.TemporaryDirectory(prefix="weight_sync_") as tmp:
        model_dir = str(Path(tmp) / "model")
        n = build_random_model(model_dir, SHAPES[args.shape], args.dtype)
        masters = "" if args.param_dtype == args.dtype else f", learner {args.param_dtype} master weights"
        print(f"[bench] {args.shape}: {n / 1e6:.1f}M parameters, {args.dtype}{masters}", flush=True)
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        results = run_all(model_dir, args)
        ray.shutdown()
    base = {r["bucket_mb"]: r for r in results if r["transport"] == args.transports[0]}
    print(f"\n| transport | bucket MiB | buckets | sync s | engine load s | learner peak RSS +MiB | vs "
          f"{args.transports[0]}, same buckets: time, memory | canary mean, max |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        b = base[r["bucket_mb"]]
        print(f"| {r['transport']} | {r['bucket_mb']:g} | {r['buckets']} | {r['sync_s']:.3f} | {r['engine_load_s']:.3f} | "
              f"{r['learner_rss_peak_mb']:.0f} | {r['sync_s'] / b['sync_s']:.2f}x, "
              f"{r['learner_rss_peak_mb'] / max(b['learner_rss_peak_mb'], 1e-9):.2f}x | "
              f"{r['canary_mean_abs_diff']:.1e}, {r['canary_max_abs_diff']:.1e} |")
    mean_bound, max_bound = CANARY_BOUNDS[args.dtype]  # engine and learner both compute in --dtype
    record = {"shape": args.shape, "dtype": args.dtype, "param_dtype": args.param_dtype, "parameters": n,
              "gpu": args.gpu, "canary_bounds": [mean_bound, max_bound], "results": results}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))
    bad = [r for r in results if r["canary_mean_abs_diff"] > mean_bound or r["canary_max_abs_diff"] > max_bound]
    if bad:
        sys.exit(f"canary failed for {[(r['transport'], r['bucket_mb']) for r in bad]} (bounds for {args.dtype}: mean "
                 f"{mean_bound:g}, max {max_bound:g})")


if __name__ == "__main__":
    main()
