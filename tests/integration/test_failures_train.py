"""`rl train` when an actor dies or the user presses Ctrl-C (real Ray, real vLLM, the tiny model): an engine killed
mid-run stops the run naming it, with the last completed step saved; `--resume` continues from it; a Ctrl-C there
finishes the step it interrupts and saves exactly that step; a killed learner keeps the last checkpoint and says so.

The actor is killed the way the kernel's OOM killer would (SIGKILL to its process and its children), found among
the `rl train` process's descendants (its local Ray's workers), so nothing outside this run is touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["run.progress=false", "run.num_steps=200", "run.save_every_steps=0", "rollout.prompts_per_step=4",
         "rollout.num_samples_per_prompt=2", "rollout.max_response_tokens=16", "data.eval.num_problems=4",
         "eval.num_samples=1", "eval.every_steps=0", "run.log_samples_per_step=0"]


def start(model_dir: str, run: Path, log: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "trainers.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={run}",
            f"model.path={model_dir}", "model.build_tiny=false", *SMALL, *extra]
    out = (run.parent / f"{log}.out").open("w")
    err = (run.parent / f"{log}.err").open("w")
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=err,
                            start_new_session=True)


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if step in logged_steps(run):
            return
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not logged within {timeout_s} s")


def kill_actor(proc: subprocess.Popen, title: str) -> None:
    """SIGKILL the run's Ray actor process whose title starts with ``title`` (e.g. ``ray::Engine``), and its
    children (the vLLM engine core)."""
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(title):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    assert len(found) == 1, [(p.pid, p.cmdline()) for p in found]
    victims = [found[0], *found[0].children(recursive=True)]
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=30)


def finish(proc: subprocess.Popen, run: Path, log: str, timeout_s: float = 300) -> tuple[int, str, str]:
    try:
        rc = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, (run.parent / f"{log}.out").read_text(), (run.parent / f"{log}.err").read_text()


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(json.loads((p / "driver_state.json").read_text())["step"]
                  for p in (run / "checkpoints").glob("step_*") if (p / "driver_state.json").exists())


def test_engine_death_saves_the_last_step_then_resume_and_ctrl_c(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(tiny_model_dir, run, "killed", "run.save_every_steps=1")
    wait_for_step(proc, run, 1)
    # Freeze the driver and kill the engine. Where the driver finds it dead depends on how far step `done + 1` had
    # got (its generation, or its weight sync once the learner had taken the update): both name the engine and
    # the step, and leave step `done` as the checkpoint to resume from.
    os.kill(proc.pid, signal.SIGSTOP)
    done = logged_steps(run)[-1]
    kill_actor(proc, "ray::Engine")
    os.kill(proc.pid, signal.SIGCONT)
    rc, out, err = finish(proc, run, "killed")
    assert rc == 1, out[-3000:] + err[-3000:]
    assert f"rl train: engine 0 died during step {done + 1}: " in err, err[-3000:]
    ckpt = run / "checkpoints" / f"step_{done:06d}"
    assert (f"saved step {done} to {ckpt}; continue with --resume." in err
            or f"step {done + 1}'s update had started, so the learner no longer holds step {done}; the last "
               f"checkpoint is {ckpt}; continue with --resume." in err), err[-3000:]
    assert checkpoint_steps(run)[-1] == done and logged_steps(run) == list(range(done + 1))

    # --resume continues from the saved step (no periodic saves now: a safe change, shown); a Ctrl-C mid-step lets
    # that step finish and saves exactly it.
    proc = start(tiny_model_dir, run, "resumed", "--resume")
    wait_for_step(proc, run, done + 1)
    os.kill(proc.pid, signal.SIGINT)
    rc, out, err = finish(proc, run, "resumed")
    assert rc == 130, out[-3000:] + err[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{done:06d}'} at step {done}" in out
    assert "Ctrl-C: stopping after this step" in out
    last = logged_steps(run)[-1]
    assert last in (done + 1, done + 2)  # the step the Ctrl-C came in, finished
    assert f"interrupted: saved step {last} to" in out
    assert logged_steps(run) == list(range(last + 1)) and checkpoint_steps(run)[-2:] == [done, last]


def test_learner_death_keeps_the_last_checkpoint_and_says_so(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    proc = start(tiny_model_dir, run, "killed", "run.save_every_steps=1")
    wait_for_step(proc, run, 2)
    os.kill(proc.pid, signal.SIGSTOP)
    done = logged_steps(run)[-1]
    kill_actor(proc, "ray::Learner")
    os.kill(proc.pid, signal.SIGCONT)
    rc, out, err = finish(proc, run, "killed")
    assert rc == 1, out[-3000:] + err[-3000:]
    assert "rl train: learner rank 0 died during step " in err, err[-3000:]
    latest = checkpoint_steps(run)[-1]
    assert latest in (done - 1, done)  # the last step's own checkpoint may not have been written before the freeze
    assert (f"the learner is gone, so nothing newer can be saved; the last checkpoint is "
            f"{run / 'checkpoints' / f'step_{latest:06d}'}; continue with --resume.") in err


def test_a_canary_failure_stops_the_run(tiny_model_dir, tmp_path):
    # bf16 engines against the fp32 learner differ by ~3e-3 per token (docs/architecture.md); held to the fp32
    # bounds, the canary after the start-up sync fails, and nothing trains.
    run = tmp_path / "run"
    proc = start(tiny_model_dir, run, "canary", "rollout.dtype=bfloat16", "sync.canary_mean_abs_diff=1e-4",
                 "sync.canary_max_abs_diff=1e-3")
    rc, out, err = finish(proc, run, "canary", timeout_s=600)
    assert rc == 1, out[-3000:] + err[-3000:]
    assert "rl train: weight sync canary failed on engine 0 at version 0: engine and learner log-probs" in err
    assert logged_steps(run) == [] and checkpoint_steps(run) == []
