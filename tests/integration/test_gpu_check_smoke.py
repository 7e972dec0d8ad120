"""scripts/gpu_check.sh --smoke: every stage's CPU variant runs (or is skipped for a stated reason) within the
smoke budget, and report.json / report.md carry the stages' numbers. (The aggregator's report of a stage stopped by
its time limit: tests/unit/test_gpu_check_report.py.)"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["env", "mixed_precision", "pytest_gpu", "engine", "lora", "fused_logprob", "learner_step"]
SMOKE_WALL_S = 150


def test_gpu_check_smoke(tmp_path):
    import torch

    out = tmp_path / "check"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=SMOKE_WALL_S + 60)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert wall < SMOKE_WALL_S, f"smoke run took {wall:.0f} s"

    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "smoke" and report["ok"] is True
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == STAGES
    assert {n: s["status"] for n, s in stages.items() if s["status"] not in ("ok", "skipped")} == {}
    assert report["limits_sum_s"] <= SMOKE_WALL_S
    md = (out / "report.md").read_text()
    for name in STAGES:
        assert f"| {name} | {stages[name]['status']} |" in md
        if stages[name]["status"] == "ok":
            assert (out / "logs" / f"{name}.log").stat().st_size > 0

    # env: the learner and engine modules import without pulling in ray, vllm, deepspeed or math_verify.
    env = stages["env"]
    assert env["status"] == "ok"
    assert env["details"]["project_imports"] == {"errors": {}, "optional_packages_imported": []}
    assert env["details"]["packages"]["torch"] == importlib.metadata.version("torch")

    # tests/gpu ran and skipped every test (no CUDA here), none failed.
    py = stages["pytest_gpu"]
    if not torch.cuda.is_available():
        assert py["status"] == "skipped" and "needs CUDA" in py["reason"]
        assert py["details"]["passed"] == py["details"]["failed"] == py["details"]["error"] == 0
        assert py["details"]["skipped"] >= 10

    # The engine and LoRA stages are left out of the smoke run, saying why.
    for name in ("engine", "lora"):
        assert stages[name]["status"] == "skipped"
        assert "smoke" in stages[name]["reason"] or "vllm" in stages[name]["reason"]

    # Fused log-probs: the chunked kernel needs less memory than naive at the largest smoke shape.
    rows = [r for r in stages["fused_logprob"]["details"]["rows"] if r["fwd+bwd ms"] != "-"]
    largest_t = max(int(r["T"]) for r in rows)
    naive = [r for r in rows if r["impl"] == "naive" and int(r["T"]) == largest_t]
    chunked = [r for r in rows if r["impl"].startswith("chunked") and int(r["T"]) == largest_t]
    assert naive and chunked
    assert float(chunked[0]["memory vs naive"]) < 0.9
    assert float(chunked[0]["peak MiB"]) < float(naive[0]["peak MiB"])

    # Learner step: packed + chunked computes the same loss as padded + naive, over the same tokens.
    ls = stages["learner_step"]["details"]
    assert set(ls["configs"]) == {"padded + naive", "packed + fused"}
    assert all(c["ok"] and c["tokens_per_s"] > 0 for c in ls["configs"].values())
    assert ls["loss_abs_diff"] < 1e-6
    assert ls["configs"]["packed + fused"]["kernels"].startswith("logprob=chunked")

    # Mixed precision: fp32 masters change nearly every weight at lr 1e-6.
    mp = stages["mixed_precision"]
    if (ROOT / "benchmarks" / "mixed_precision.py").exists():
        assert mp["status"] == "ok"
        assert mp["details"]["mixed_share"] is not None and mp["details"]["mixed_share"] > 0.9
    else:
        assert mp["status"] == "skipped" and "mixed_precision.py" in mp["reason"]
