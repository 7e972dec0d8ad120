"""scripts/gpu_check_report.py: a stage stopped by its time limit is reported as a timeout, with the end of its
log and its test counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.test_gpu_check_smoke import STAGES

ROOT = Path(__file__).resolve().parents[2]


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
    assert [stages[n]["status"] for n in STAGES] == ["ok", "skipped", "timeout", "skipped", "skipped", "skipped",
                                                     "skipped"]
    assert stages["pytest_gpu"]["details"]["passed"] == 1 and stages["pytest_gpu"]["details"]["failed"] == 1
    assert stages["pytest_gpu"]["log_tail"][-1] == "still running"
    assert stages["pytest_gpu"]["gpu_processes_after"] == "1"
    md = (out / "report.md").read_text()
    assert "| pytest_gpu | timeout | 140 | 140 | 1 passed, 1 failed" in md
    assert "## pytest_gpu: timeout" in md and "| engine | skipped | 0 | 150 | vllm is not importable |" in md


def test_report_summarizes_the_lora_stage(tmp_path):
    """The lora stage's key numbers come from scripts/gpu_lora_check.py's JSON; a failed check is named."""
    out = tmp_path / "check"
    (out / "logs").mkdir(parents=True)
    (out / "results").mkdir()
    (out / "stages.tsv").write_text("lora\t1\t80\t90\t\t0\n")
    gap = lambda mean, mx: {"mean": mean, "max": mx, "n": 48}  # noqa: E731
    (out / "results" / "lora.json").write_text(json.dumps({
        "stage": "lora", "status": "failed", "failed": ["second_version: gap to new 0.3 (bound 0.05), to old 0.01"],
        "checks": {"env": {"dtype": "bfloat16"}, "engine_start_s": 41.5,
                   "adapter_gap": {"ok": True, "load_s": 0.02, "lora_id": 1, "gap_to_merged": gap(2e-3, 3e-2),
                                   "gap_to_base": gap(0.1, 0.5), "bound": 0.05},
                   "second_version": {"ok": False, "lora_id": 2, "gap_to_new": gap(0.1, 0.3),
                                      "gap_to_old": gap(1e-3, 1e-2)}}}))
    proc = subprocess.run([sys.executable, "scripts/gpu_check_report.py", "aggregate", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lora = {s["stage"]: s for s in json.loads((out / "report.json").read_text())["stages"]}["lora"]
    assert lora["status"] == "failed"
    assert lora["key"] == ("bfloat16; start 41.5 s; adapter gap to merged max 0.03 (bound 0.05; to the base 0.5), "
                           "load 0.02 s; version 2 WRONG (id 2, gap to new 0.3, to old 0.01); FAILED: second_version: "
                           "gap to new 0.3 (bound 0.05), to old 0.01")
