"""`rl train` with a reward plug-in that raises on every response a run sends (it passes the start-up smoke call):
the run stops at the first step with the reward's name and error text, keeps a checkpoint, and writes the error and
the per-reward scores to samples.jsonl. Beside it a plug-in kills its reward worker on half the responses: each
crash grades that response 0 with the crash as its error, and the others are graded by new workers. In the same run, `length_penalty` with `unit: tokens` grades every
response from the token count the driver passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
REWARDS = ("rewards=[{name: math_verify}, "
           "{name: length_penalty, kwargs: {max_length: 8, buffer_length: 4, unit: tokens}}, "
           "{name: 'tests/fixtures/reward_plugins.py:fails_at_run_time'}, "
           "{name: 'tests/fixtures/reward_plugins.py:crashes_at_run_time'}]")


def expected_length_penalty(num_tokens: int) -> float:
    # max_length 8, buffer 4: 0 up to 4 tokens, then -(L - 4) / 4, -1 from 8 on
    return 0.0 if num_tokens <= 4 else -min(num_tokens - 4, 4) / 4


def test_a_reward_failing_at_run_time_stops_the_run_with_a_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "trainers.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={out}",
            f"model.path={tiny_model_dir}", "model.build_tiny=false", "run.progress=false", "run.num_steps=2",
            "run.save_every_steps=0", "run.log_samples_per_step=8", "rollout.prompts_per_step=4",
            "rollout.num_samples_per_prompt=2", "data.eval.num_problems=4", "eval.num_samples=1",
            "eval.every_steps=0", REWARDS, "run.trackers=[jsonl,wandb,mlflow]", "run.tags=[ci]"]
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert ("rl train: reward 'fails_at_run_time' errored on 8/8 responses of step 1 (reward_pool.max_error_rate=1); "
            "first error: KeyError: \"no grading table for prompt") in proc.stderr, proc.stderr[-3000:]
    assert "continue with --resume" in proc.stderr
    # The last completed step (0: the start) is saved, and nothing of step 1 was trained or checkpointed.
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_000000"]
    assert json.loads((out / "checkpoints" / "step_000000" / "driver_state.json").read_text())["step"] == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["step"] for r in rows} == {1}
    crashes: list[bool] = []
    for row in rows:
        assert row["status"] == "error"
        assert f"fails_at_run_time: KeyError: \"no grading table for prompt '{row['prompt_id']}'\"" in row["error"]
        assert "length_penalty" not in row["error"]
        assert row["finish_reason"] in ("stop", "length") and row["num_response_tokens"] >= 1
        components = row["components"]
        assert components["fails_at_run_time"] == 0.0
        assert components["length_penalty"] == pytest.approx(expected_length_penalty(row["num_response_tokens"]))
        # a reward worker that dies grades its response 0 with the crash as the error; the next response gets a
        # new worker (each prompt's first sample crashed its worker, the second was graded)
        crashed = "crashes_at_run_time: the reward worker crashed (exit code 3)" in row["error"]
        assert components["crashes_at_run_time"] == (0.0 if crashed else 0.5)
        crashes.append(crashed)
        assert row["reward"] == pytest.approx(components["math_verify"] + components["length_penalty"]
                                              + components["crashes_at_run_time"])
    assert any(r["components"]["length_penalty"] < 0 for r in rows), "no response over 4 tokens: test proves little"
    assert sum(crashes) == 4  # the first of each prompt's 2 samples

    # The console is quiet: the run's own lines, no library INFO, no warnings known to be harmless; the engine's and
    # the learner's full output is in the run's logs/ folder.
    console = (proc.stdout + proc.stderr).splitlines()
    for noise in (" INFO ", "RotaryEmbedding", "Token authentication", "Setting accelerator to CPU",
                  "Loading safetensors", "Writing model shards", "mlflow.store"):
        assert not [ln for ln in console if noise in ln], (noise, console)
    assert len(console) <= 12, "\n".join(console)
    engine_log = next((out / "logs").glob("engine-*.log")).read_text()
    # vLLM's lines of every sync (whatever the transport) are in the engine's log, not on the console
    assert "Successfully reset prefix cache" in engine_log and "RotaryEmbedding" in engine_log
    assert "[learner] kernels" in next((out / "logs").glob("learner0-*.log")).read_text()

    # The trackers got step 0 (the only step logged before the stop), the run's name and tags, and were closed.
    from mlflow.tracking import MlflowClient

    from tests.tracker_records import wandb_records

    state = json.loads((out / "trackers.json").read_text())
    run = MlflowClient(state["mlflow_tracking_uri"]).get_run(state["mlflow_run_id"])
    assert run.info.run_name == "run" and "ci" in run.data.tags and run.info.status == "FINISHED"
    assert run.data.metrics["eval/accuracy"] == json.loads((out / "metrics.jsonl").read_text())["eval/accuracy"]
    assert run.data.params["rollout.num_samples_per_prompt"] == "2"
    history = [r.history for r in wandb_records(out) if r.WhichOneof("record_type") == "history"]
    assert len(history) == 1
