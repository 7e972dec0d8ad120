"""scripts/gpu_check.sh --smoke: every stage's CPU variant runs (or is skipped for a stated reason) within the
smoke budget, and report.json / report.md carry the stages' numbers. The aggregator also reports a stage stopped by
its time limit as a timeout, with the end of its log."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["env", "mixed_precision", "pytest_gpu", "engine", "fused_logprob", "learner_step"]
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

    # The engine is left out of the smoke run, saying why.
    assert stages["engine"]["status"] == "skipped"
    assert "smoke" in stages["engine"]["reason"] or "vllm" in stages["engine"]["reason"]

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


def test_report_names_a_timed_out_stage_and_keeps_its_log(tmp_path):
    out = tmp_path / "check"
    (out / "logs").mkdir(parents=True)
    (out / "results").mkdir()
    (out / "stages.tsv").write_text("env\t0\t3\t20\t\t-\npytest_gpu\t124\t140\t140\t\t1\n"
                                    "engine\t\t0\t150\tvllm is not importable\t-\n")
    (out / "results" / "env.json").write_text(json.dumps({"packages": {"torch": "2.11.0"}, "project_imports": {}}))
    (out / "logs" / "pytest_gpu.log").write_text(
        "tests/gpu/test_a.py::test_one PASSED [ 10%]\ntests/gpu/test_a.py::test_two FAILED [ 20%]\nstill running\n")
    proc = subprocess.run([sys.executable, "scripts/gpu_check_report.py", "aggregate", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    report = json.loads((out / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert [stages[n]["status"] for n in STAGES] == ["ok", "skipped", "timeout", "skipped", "skipped", "skipped"]
    assert stages["pytest_gpu"]["details"]["passed"] == 1 and stages["pytest_gpu"]["details"]["failed"] == 1
    assert stages["pytest_gpu"]["log_tail"][-1] == "still running"
    assert stages["pytest_gpu"]["gpu_processes_after"] == "1"
    md = (out / "report.md").read_text()
    assert "| pytest_gpu | timeout | 140 | 140 | 1 passed, 1 failed" in md
    assert "## pytest_gpu: timeout" in md and "| engine | skipped | 0 | 150 | vllm is not importable |" in md
