"""End to end: `rl train configs/tiny_cpu.yaml` runs all its parts on the tiny model, and a run
resumed from its mid-run checkpoint reproduces the uninterrupted run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Learning is NOT asserted yet: measured runs of this recipe did not raise held-out accuracy (lr 3e-4: greedy
# 0.385 -> 0.220 in 20 steps; docs/benchmarks.md). Restoring a gain assertion is open work.
COMPARED = ("reward/mean", "reward/accuracy", "loss/policy", "rollout/response_len_mean", "eval/accuracy")


def _rl(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "rl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1500)
    if proc.returncode != 0:
        raise AssertionError(f"rl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("e2e") / "run"
    _rl("train", "configs/tiny_cpu.yaml", f"run.output_dir={run}", "run.progress=false", cwd=ROOT)
    return run


def test_training_runs_end_to_end(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    print(f"held-out accuracy {before:.3f} -> {after:.3f}")
    assert before > 0.05, f"the warm-started tiny model should be right some of the time, got {before:.3f}"
    assert 0.0 <= after <= 1.0
    m = _metrics(trained_run)
    last = max(m)
    assert m[last]["sync/canary_max_abs_diff"] < 1e-3
    assert m[last]["reward/math_verify/timeout_rate"] == 0.0
    for name in ("config.yaml", "samples.jsonl", "summary.json"):
        assert (trained_run / name).exists()
    assert list((trained_run / "tb").iterdir()), "no TensorBoard events"


def test_resume_reproduces_uninterrupted_run(trained_run, tmp_path):
    """Resume from the mid-run checkpoint of a copy of the run: the later steps' metrics must match."""
    ckpts = sorted((trained_run / "checkpoints").glob("step_*"))
    assert len(ckpts) >= 2, ckpts
    mid, last = ckpts[-2], ckpts[-1]
    mid_step, last_step = int(mid.name.split("_")[1]), int(last.name.split("_")[1])
    copy = tmp_path / "resumed"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns(last.name, "tb"))
    _rl("train", "configs/tiny_cpu.yaml", f"run.output_dir={copy}", "run.progress=false", "--resume", cwd=ROOT)
    full, resumed = _metrics(trained_run), _metrics(copy)
    assert sorted(resumed) == sorted(full)
    for step in range(mid_step + 1, last_step + 1):
        for key in COMPARED:
            if key in full[step]:
                assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-4, abs=1e-5), (step, key)
