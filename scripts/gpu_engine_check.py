"""The rollout engine on this machine, through the project's public API (``rollout.engine.Engine``):

    python scripts/gpu_engine_check.py --json OUT/engine.json [--work DIR] [--smoke]

Checks, in order (each one is written to the JSON file as soon as it is done, so a run stopped by its time limit
still reports what it reached):

1. ``runner``: the model runner the engine's worker uses (V1 ``gpu_model_runner``, V2 ``gpu.model_runner``, CPU).
2. ``canary_gap``: the engine's log-probs (``score_tokens``) against transformers' on the same weights, in the
   engine's dtype; mean and max separately (in bf16 the max is much larger than the mean).
3. ``sync``: the transformers model's weights are perturbed and pushed in layer-whole buckets
   (``trainers.weight_export.plan_weight_buckets`` + ``Engine.load_weight_bucket``); the gap to the perturbed reference
   must stay at its pre-sync size, the gap to the old weights must grow, and every worker must report the version.
4. ``ipc_sync``: the weights perturbed again and pushed over ``sync.transport=ipc`` (the learner's
   ``trainers.weight_transport.IpcSender`` packs each bucket into a shared buffer on the model's device, CUDA IPC on a
   GPU; the engine's ``rl_ipc`` transfer engine maps it): the same gap checks, version 2 on every worker.
5. ``drafter_reload``: new EAGLE drafter weights through ``Engine.load_drafter_weights``, then a greedy generation
   with the drafter must still work.
6. ``sleep_wake``: sleep level 2, wake the weights, push the weights, a request while half awake must be refused,
   wake the KV cache, then the canary; the drafter's own weights must survive the level-2 sleep (the engine keeps
   them with ``sleep_preserve_parameter_names``). On CUDA the sleep frees memory; on the CPU build it is vLLM's
   scheduler pause. Each call runs in a thread with a time limit, so a hang is reported as TIMEOUT.

Without vLLM the check is reported as skipped. ``--smoke``: a tiny fp32 model, eager, on CPU.
Exit code 0 when every check that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of the runner-name function
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A synced engine must agree with the reference as well as before the sync, up to this factor (+ an absolute
# floor for fp32, where the gap is ~1e-6).
SYNC_GAP_FACTOR = 2.0
SYNC_GAP_FLOOR = 1e-3
TINY = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)


class Report:
    def __init__(self, path: Path | None):
        self.path, self.data = path, {"stage": "engine", "status": "running", "checks": {}, "failed": []}

    def put(self, key: str, value) -> None:
        self.data["checks"][key] = value
        print(f"[engine] {key}: {json.dumps(value, default=str)}", flush=True)
        self.flush()

    def fail(self, key: str, why: str) -> None:
        self.data["failed"].append(f"{key}: {why}")
        self.flush()

    def flush(self) -> None:
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.path)


def timed(fn, limit_s: float):
    """Run ``fn`` in a daemon thread: ("OK", value, s), ("ERROR", message, s) or ("TIMEOUT", None, s)."""
    box: dict = {}
    t0 = time.perf_counter()

    def target():
        try:
            box["v"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported, not raised
            box["e"] = f"{type(exc).__name__}: {exc}"[:400]

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit_s)
    dt = round(time.perf_counter() - t0, 3)
    if th.is_alive():
        return "TIMEOUT", None, dt
    return ("ERROR", box["e"], dt) if "e" in box else ("OK", box.get("v"), dt)


def reference_logprobs(model, seqs) -> list[list[float]]:
    """Transformers' log-probs (temperature 1) of each response token."""
    import torch

    out = []
    with torch.no_grad():
        for p, r in seqs:
            ids = torch.tensor([list(p) + list(r)], device=model.device)
            logits = model(ids).logits[0, len(p) - 1:len(p) - 1 + len(r)].float()
            lp = torch.log_softmax(logits, dim=-1)
            out.append(lp[torch.arange(len(r), device=lp.device), torch.tensor(r, device=lp.device)].tolist())
    return out


def gap(a, b) -> dict:
    d = [abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)]
    return {"mean": sum(d) / len(d), "max": max(d), "n": len(d)}


def _refused(fn) -> str:
    """``fn`` must raise the engine's half-awake error at once (a request would wait forever in vLLM's paused
    scheduler)."""
    try:
        fn()
    except RuntimeError as e:
        if "asleep" in str(e):
            return "refused"
        raise
    raise AssertionError("a half-awake engine accepted a request")


def _drafter_checksum(worker) -> float:
    """Sum of the drafter's own parameters (those it does not share with the target), on the worker."""
    model = worker.get_draft_model()
    shared = {id(p) for p in worker.get_model().parameters()}
    return float(sum(p.float().sum() for p in model.parameters() if id(p) not in shared))


def _runner_name(worker) -> str:
    runner = getattr(worker, "model_runner", None)
    return f"{type(runner).__module__}.{type(runner).__name__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here (updated after every check)")
    ap.add_argument("--work", type=Path, default=None, help="model and drafter directory (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 model, eager (CPU)")
    ap.add_argument("--call-limit", type=float, default=None, help="seconds for one blocking engine call")
    args = ap.parse_args()
    return run_stage("engine", Report(args.json), args, ("vllm",), run_checks)


def run_stage(label: str, rep: Report, args, modules: tuple[str, ...], checks) -> int:
    """Run ``checks(args, rep, work) -> failed`` for a check script (``[label]`` on its lines): skipped, and
    reported so, when one of ``modules`` is not importable; a crash is reported as a failed ``crash`` check. Ends
    the process with ``os._exit`` (no engine teardown: a hung engine thread must not keep it alive)."""
    if any(importlib.util.find_spec(m) is None for m in modules):
        reason = f"{' or '.join(modules)} is not importable"
        rep.data.update(status="skipped", reason=reason)
        rep.flush()
        print(f"[{label}] skipped: {reason}")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix=f"gpu_{label}_check_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        failed = checks(args, rep, work)
    except Exception as exc:  # noqa: BLE001 - the report names it
        rep.fail("crash", f"{type(exc).__name__}: {exc}"[:400])
        failed = True
    rep.data["status"] = "failed" if failed else "ok"
    rep.flush()
    print(f"[{label}] {rep.data['status']}: {args.json or ''}", flush=True)
    sys.stdout.flush()
    os._exit(1 if failed else 0)


def run_checks(args, rep: Report, work: Path) -> bool:
    import torch
    from safetensors.torch import save as st_save
    from transformers import AutoModelForCausalLM

    import vllm

    from rollout.drafter.checkpoint import save_drafter, weights_for_reload
    from rollout.drafter.model import Drafter
    from rollout.engine import Engine, GenerationRequest, SamplingSettings
    from trainers.weight_export import plan_weight_buckets
    from trainers.tiny_model import QWEN25_1_5B_SHAPE, build_random_model

    gpu = torch.cuda.is_available() and not args.smoke
    dtype = "bfloat16" if gpu else "float32"
    limit = args.call_limit or (60.0 if gpu else 30.0)
    rep.put("env", {"vllm": vllm.__version__, "torch": torch.__version__, "dtype": dtype,
                    "device": torch.cuda.get_device_name(0) if gpu else "cpu",
                    "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER")})

    # A random model: Qwen2.5-1.5B's width and vocabulary with 4 layers on the GPU, a tiny one on CPU.
    model_dir = work / "model"
    t0 = time.perf_counter()
    if not (model_dir / "config.json").exists():
        shape = {**QWEN25_1_5B_SHAPE, "num_hidden_layers": 4, "max_position_embeddings": 2048} if gpu else TINY
        build_random_model(model_dir, shape, dtype)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    ref = ref.to("cuda" if gpu else "cpu").eval()
    torch.manual_seed(0)
    drafter = Drafter.from_target(ref, seed=0).to(dtype=torch.float32, device="cpu")
    drafter_dir = save_drafter(drafter, work / "drafter")
    rep.put("build_s", round(time.perf_counter() - t0, 1))

    spec = {"method": "eagle", "model": str(drafter_dir), "num_speculative_tokens": 2}
    t0 = time.perf_counter()
    eng = Engine(str(model_dir), dtype=dtype, max_model_len=1024, gpu_memory_utilization=0.3 if gpu else 0.15,
                 enforce_eager=not gpu, enable_sleep_mode=True, speculative_config=spec, weight_transfer="rl_ipc")
    rep.put("engine_start_s", round(time.perf_counter() - t0, 1))
    status, runner, _ = timed(lambda: eng.llm.collective_rpc(_runner_name)[0], limit)
    rep.put("runner", runner if status == "OK" else f"{status}: {runner}")
    failed = False

    # Generation, then the engine-vs-transformers gap on the same weights.
    reqs = [GenerationRequest(f"p{i}", f"{i} + {2 * i} =", 4, seed=i) for i in range(16 if gpu else 2)]
    settings = SamplingSettings(temperature=1.0, max_tokens=64 if gpu else 12)
    status, groups, dt = timed(lambda: eng.generate(reqs, settings), limit)
    if status != "OK":
        rep.put("generate", {"status": status, "error": groups, "s": dt})
        rep.fail("generate", status)
        return True
    rolls = [r for g in groups for r in g]
    rep.put("generate", {"status": "OK", "s": dt, "tokens": sum(len(r.response_token_ids) for r in rolls)})
    probe = [(r.prompt_token_ids, r.response_token_ids[:16]) for r in rolls[:4] if r.response_token_ids]
    status, before, dt = timed(lambda: eng.score_tokens(probe), limit)
    if status != "OK":
        rep.put("canary_gap", {"status": status, "error": before})
        rep.fail("canary_gap", status)
        return True
    gap_before = gap(before, reference_logprobs(ref, probe))
    rep.put("canary_gap", gap_before)

    # Bucketed sync of perturbed weights.
    old_ref = reference_logprobs(ref, probe)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * p.float().std().to(p.dtype) * 0.05)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in ref.state_dict().items()}
    bucket_bytes = (256 << 20) if gpu else (64 << 10)
    buckets = plan_weight_buckets([(k, v.numel() * v.element_size()) for k, v in state.items()], bucket_bytes)

    def push(version: int) -> float:
        t = time.perf_counter()
        for i, names in enumerate(buckets):
            eng.load_weight_bucket(st_save({n: state[n] for n in names}), version, i == len(buckets) - 1)
        return round(time.perf_counter() - t, 3)

    status, push_s, _ = timed(lambda: push(1), limit)
    if status != "OK":
        rep.put("sync", {"status": status, "error": push_s})
        rep.fail("sync", status)
        return True
    after = eng.score_tokens(probe)
    new_ref = reference_logprobs(ref, probe)
    gap_after, gap_old = gap(after, new_ref), gap(after, old_ref)
    versions = eng.worker_weight_versions()
    bound = SYNC_GAP_FACTOR * gap_before["max"] + SYNC_GAP_FLOOR
    sync_ok = gap_after["max"] <= bound and gap_old["max"] > gap_after["max"] and versions == [1] * len(versions)
    rep.put("sync", {"ok": sync_ok, "buckets": len(buckets), "push_s": push_s, "versions": versions,
                     "gap_to_new_weights": gap_after, "gap_to_old_weights": gap_old, "bound": bound})
    if not sync_ok:
        failed = True
        rep.fail("sync", f"gap {gap_after['max']:.3g} > {bound:.3g}, or versions {versions}")

    # The same over the ipc transport: shared buffers on the model's device, mapped by the engine's workers.
    status, info, dt = timed(lambda: ipc_push(eng, ref, buckets, 2), limit)
    if status != "OK":
        rep.put("ipc_sync", {"status": status, "error": info, "s": dt})
        rep.fail("ipc_sync", status)
        return True
    after, ipc_ref = eng.score_tokens(probe), reference_logprobs(ref, probe)
    gap_ipc, gap_prev = gap(after, ipc_ref), gap(after, new_ref)
    versions = eng.worker_weight_versions()
    ipc_ok = gap_ipc["max"] <= bound and gap_prev["max"] > gap_ipc["max"] and versions == [2] * len(versions)
    rep.put("ipc_sync", {"ok": ipc_ok, "s": dt, **info, "versions": versions, "gap_to_new_weights": gap_ipc,
                         "gap_to_previous_weights": gap_prev, "bound": bound})
    if not ipc_ok:
        failed = True
        rep.fail("ipc_sync", f"gap {gap_ipc['max']:.3g} > {bound:.3g}, or versions {versions}")
    new_ref = ipc_ref
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in ref.state_dict().items()}

    # Drafter reload, then greedy generation through the drafter.
    with torch.no_grad():
        for p in drafter.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    blob = weights_for_reload(drafter, dtype=getattr(torch, dtype))
    status, info, dt = timed(lambda: eng.load_drafter_weights(blob), limit)
    greedy = [GenerationRequest(f"g{i}", f"{i} + {i} =", 1) for i in range(4)]
    g_status, g_out, _ = (timed(lambda: eng.generate(greedy, SamplingSettings(temperature=0.0, max_tokens=16)), limit)
                          if status == "OK" else ("SKIPPED", None, 0))
    drafter_ok = status == "OK" and g_status == "OK"
    rep.put("drafter_reload", {"ok": drafter_ok, "status": status, "s": dt,
                               "detail": info if status != "OK" else {k: info[k] for k in ("num_tensors", "bytes")},
                               "generate_after": g_status})
    if not drafter_ok:
        failed = True
        rep.fail("drafter_reload", f"{status} / generate {g_status}: {info if status != 'OK' else g_out}")

    # Sleep level 2 -> wake weights -> push -> wake KV cache -> canary (the driver's colocated order). On a GPU the
    # sleep frees memory; on the CPU build it is vLLM's scheduler pause, held until every tag is awake.
    status, sum_before, _ = timed(lambda: eng.llm.collective_rpc(_drafter_checksum)[0], limit)
    steps = {"sleep_frees_memory": eng.sleep_supported(), "drafter_checksum_before": sum_before}
    for name, fn in (("sleep_level2", lambda: eng.sleep(2)),
                     ("wake_weights", lambda: eng.wake_up(["weights"])),
                     ("push", lambda: push(3)),
                     ("half_awake_generate_refused", lambda: _refused(lambda: eng.score_tokens(probe))),
                     ("wake_kv_cache", lambda: eng.wake_up(["kv_cache"])),
                     ("canary", lambda: eng.score_tokens(probe)),
                     ("drafter_checksum_after", lambda: eng.llm.collective_rpc(_drafter_checksum)[0])):
        status, value, dt = timed(fn, limit)
        steps[name] = {"status": status, "s": dt}
        if status != "OK":
            steps[name]["error"] = value
            rep.put("sleep_wake", {"ok": False, "steps": steps})
            rep.fail("sleep_wake", f"{name}: {status}")
            return True
        if name == "canary":
            steps[name]["gap"] = gap(value, new_ref)
        if name == "drafter_checksum_after":
            steps[name]["value"] = value
    kept = steps["drafter_checksum_after"]["value"] == sum_before  # sleep_preserve_parameter_names
    canary_ok = steps["canary"]["gap"]["max"] <= bound
    rep.put("sleep_wake", {"ok": canary_ok and kept, "drafter_kept_through_level2": kept, "steps": steps,
                           "versions": eng.worker_weight_versions()})
    if not canary_ok:
        rep.fail("sleep_wake", f"canary gap after wake {steps['canary']['gap']['max']:.3g} > {bound:.3g}")
        return True
    if not kept:
        rep.fail("sleep_wake", f"the drafter's own weights changed across a level-2 sleep ({sum_before} -> "
                 f"{steps['drafter_checksum_after']['value']}): publish the drafter after every sync")
        return True
    return failed


def ipc_push(eng, ref, buckets: list[list[str]], version: int) -> dict:
    """Perturb ``ref`` and push it to ``eng`` over ``rl_ipc`` as the driver does (``trainers.sync.push_weights_transfer``
    with ``handoff``), the sender on ``ref``'s device; returns the transfer's numbers."""
    import torch

    from rl.weight_wire import BucketMeta, dtype_name
    from trainers.weight_transport import IpcSender

    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * p.float().std().to(p.dtype) * 0.05)
    state = dict(ref.state_dict())
    sender = IpcSender(next(ref.parameters()).device)
    t0 = time.perf_counter()
    eng.init_weight_transfer({})
    eng.start_weight_update()
    for b, names in enumerate(buckets):
        meta = BucketMeta(list(names), [dtype_name(state[n].dtype) for n in names], [list(state[n].shape) for n in names])
        sent = sender.send(meta, [state[n] for n in names])
        eng.update_weights({**meta.as_dict(), "bucket": b, "num_buckets": len(buckets), "handle": sent["handle"]})
    done = eng.finish_weight_update(version)
    sender.close()
    return {"push_s": round(time.perf_counter() - t0, 3), "load_s": round(done["load_s"], 3), "buckets": len(buckets),
            "handle_kind": "cuda" if "cuda" in sent["handle"] else "file"}


if __name__ == "__main__":
    sys.exit(main())
