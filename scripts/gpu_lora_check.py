"""The LoRA adapter path of the rollout engine on this machine (``rollout.engine.Engine`` with ``max_lora_rank``):

    python scripts/gpu_lora_check.py --json OUT/lora.json [--work DIR] [--smoke]

Checks, in order (each written to the JSON file when done, so a run stopped by its time limit reports what it
reached):

1. ``adapter_gap``: a random model with a peft adapter (B perturbed, so it matters), written by
   ``trainers.lora.adapter_files`` in the engine's dtype and loaded with ``Engine.load_adapter``: the engine's
   log-probs (``score_tokens``, through the adapter) against transformers' on the merged weights
   (``trainers.lora.merged_state_dict``), mean and max; and against the base alone, which must differ more.
2. ``second_version``: the adapter perturbed again and loaded as version 2 (a new LoRA id): the gap to the new
   merged weights stays at its size, the gap to version 1's grows, the engine reports version 2.
3. ``generate``: sampling through the adapter works and tags its rollouts with version 2.

Not run yet on a GPU (vLLM's CUDA LoRA kernels, the bf16 gap through an adapter); ``--smoke``: a tiny fp32 model,
eager, on CPU (what CI's vLLM CPU build serves). Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine_check import (  # noqa: E402
    SYNC_GAP_FACTOR, SYNC_GAP_FLOOR, TINY, Report, gap, reference_logprobs, run_stage, timed,
)

RANK = 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here (updated after every check)")
    ap.add_argument("--work", type=Path, default=None, help="model directory (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 model, eager (CPU)")
    args = ap.parse_args()
    rep = Report(args.json)
    rep.data["stage"] = "lora"
    return run_stage("lora", rep, args, ("vllm", "peft"), run_checks)


def run_checks(args, rep: Report, work: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    import vllm

    from rollout.engine import Engine, GenerationRequest, SamplingSettings
    from trainers.lora import adapter_files, apply_lora, merged_state_dict
    from trainers.tiny_model import QWEN25_1_5B_SHAPE, build_random_model

    gpu = torch.cuda.is_available() and not args.smoke
    dtype = "bfloat16" if gpu else "float32"
    tdtype = getattr(torch, dtype)
    limit = 60.0 if gpu else 30.0
    rep.put("env", {"vllm": vllm.__version__, "torch": torch.__version__, "dtype": dtype,
                    "device": torch.cuda.get_device_name(0) if gpu else "cpu"})
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        shape = {**QWEN25_1_5B_SHAPE, "num_hidden_layers": 4, "max_position_embeddings": 2048} if gpu else TINY
        build_random_model(model_dir, shape, dtype)
    device = "cuda" if gpu else "cpu"
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), rank=RANK, alpha=16)
    policy = policy.to(device).eval()

    def perturb(seed: int) -> None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.05)

    def merged_reference():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype).to(device).eval()
        ref.load_state_dict({k: v.to(tdtype) for k, v in merged_state_dict(policy).items()}, strict=False)
        return ref

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype).to(device).eval()
    t0 = time.perf_counter()
    eng = Engine(str(model_dir), dtype=dtype, max_model_len=1024, gpu_memory_utilization=0.3 if gpu else 0.15,
                 enforce_eager=not gpu, max_lora_rank=RANK)
    rep.put("engine_start_s", round(time.perf_counter() - t0, 1))
    reqs = [GenerationRequest(f"p{i}", f"{i} + {2 * i} =", 2, seed=i) for i in range(8 if gpu else 2)]
    settings = SamplingSettings(temperature=1.0, max_tokens=32 if gpu else 12)
    rolls = [r for g in eng.generate(reqs, settings) for r in g]
    probe = [(r.prompt_token_ids, r.response_token_ids[:16]) for r in rolls[:4] if r.response_token_ids]
    base_gap = gap(eng.score_tokens(probe), reference_logprobs(base, probe))  # the engine's own gap, no adapter
    failed = False

    perturb(1)
    status, info, dt = timed(lambda: eng.load_adapter(adapter_files(policy, dtype=tdtype), 1), limit)
    if status != "OK":
        rep.put("adapter_gap", {"status": status, "error": info})
        rep.fail("adapter_gap", status)
        return True
    got = eng.score_tokens(probe)
    v1_ref = reference_logprobs(merged_reference(), probe)
    to_merged, to_base = gap(got, v1_ref), gap(got, reference_logprobs(base, probe))
    bound = SYNC_GAP_FACTOR * base_gap["max"] + SYNC_GAP_FLOOR
    ok = to_merged["max"] <= bound and to_base["max"] > to_merged["max"]
    rep.put("adapter_gap", {"ok": ok, "load_s": dt, "lora_id": info["lora_id"], "bytes": info["bytes"],
                            "gap_to_merged": to_merged, "gap_to_base": to_base, "engine_gap_without_adapter": base_gap,
                            "bound": bound})
    if not ok:
        failed = True
        rep.fail("adapter_gap", f"gap to merged {to_merged['max']:.3g} > {bound:.3g} or not below the base's")

    perturb(2)
    status, info, dt = timed(lambda: eng.load_adapter(adapter_files(policy, dtype=tdtype), 2), limit)
    if status != "OK":
        rep.put("second_version", {"status": status, "error": info})
        rep.fail("second_version", status)
        return True
    got = eng.score_tokens(probe)
    to_new, to_old = gap(got, reference_logprobs(merged_reference(), probe)), gap(got, v1_ref)
    ok = to_new["max"] <= bound and to_old["max"] > to_new["max"] and eng.weight_version == 2 and info["lora_id"] == 2
    rep.put("second_version", {"ok": ok, "load_s": dt, "lora_id": info["lora_id"], "version": eng.weight_version,
                               "gap_to_new": to_new, "gap_to_old": to_old})
    if not ok:
        failed = True
        rep.fail("second_version", f"gap to new {to_new['max']:.3g} (bound {bound:.3g}), to old {to_old['max']:.3g}")

    status, groups, dt = timed(lambda: eng.generate(reqs, settings), limit)
    ok = status == "OK" and all(r.policy_version == 2 for g in groups for r in g)
    rep.put("generate", {"ok": ok, "status": status, "s": dt})
    if not ok:
        failed = True
        rep.fail("generate", f"{status}: {groups if status != 'OK' else 'rollouts not tagged with version 2'}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
