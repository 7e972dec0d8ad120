"""``rl train`` with the adaptive drafter (configs/drafter_tiny_cpu.yaml) on the real vLLM and Ray: the run completes
with the drafter's metrics, sampling stays lossless (the engine's log-probs of the sampled tokens equal the
learner's), the drafter trained online raises the acceptance length, and a resume starts the engines with the
checkpoint's drafter."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_algorithms_train import steps, train
from tests.references import check_reference, observed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = ["run.num_steps=4", "rollout.prompts_per_step=8", "learner.torch_threads=1", "run.save_every_steps=4"]


def test_rl_train_with_adaptive_drafter_then_resume(warm_tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    rows = steps(train("configs/drafter_tiny_cpu.yaml", warm_tiny_model_dir, out, *SMALL))
    assert len(rows) == 4
    first_run = observed(out)
    for r in rows:
        # lossless: the engine's log-probs of what it sampled are the policy's (speculative or not)
        assert r["rollout/logprob_abs_diff_max"] < 1e-3
        assert r["sync/canary_max_abs_diff"] < 1e-3
        assert r["perf/drafter_publish_s"] > 0 and r["drafter/published_version"] == r["step"]
        assert 0 < r["rollout/spec/long_tail_time_frac"] <= 1.0
        assert 0 < r["rollout/spec/long_tail_step_frac"] < 1.0
        assert any(k.startswith("rollout/spec/k_") for k in r)
    assert rows[0]["drafter/steps"] == 0.0  # nothing captured before the first update
    trained = rows[1:]
    assert all(r["drafter/steps"] > 0 and r["drafter/train_s"] > 0 and "drafter/loss" in r for r in trained)
    assert all(0.0 <= r["drafter/idle_overlap_frac"] <= 1.0 for r in trained)
    # speculation ran with the drafter the learner trained online, and it got better at it
    acc = [r["rollout/spec_decode/mean_acceptance_length"] for r in rows[2:]]
    assert max(acc) > 1.2, acc
    assert rows[-1]["drafter/loss"] < rows[1]["drafter/loss"]
    ckpt = out / "checkpoints" / "step_000004"
    assert (ckpt / "drafter" / "model.safetensors").is_file() and (ckpt / "drafter_trainer.pt").is_file()
    state = json.loads((ckpt / "driver_state.json").read_text())
    assert state["spec_decode"]["policy"]["bandit"] is not None

    # resumed in fixed mode (K=3 at every batch size of this run), so step 5 surely drafts
    resumed = train("configs/drafter_tiny_cpu.yaml", warm_tiny_model_dir, out, *SMALL, "run.num_steps=5",
                    "drafter.mode=fixed", "--resume", "--allow-config-change")
    assert sorted(resumed) == [0, 1, 2, 3, 4, 5]  # the log was kept up to the checkpoint, step 5 appended
    # the engines started with the checkpoint's trained drafter (a fresh one accepts almost nothing: ~1.0)
    assert resumed[5]["rollout/spec_decode/mean_acceptance_length"] > 1.2
    assert resumed[5]["drafter/steps"] == 0.0  # the buffer is not checkpointed: it refills from step 5 on
    # The drafter trains within a wall-clock budget and the bandit picks K from measured throughput, and with
    # speculation the sampled tokens depend on the drafts: two runs of the same code part after step 1 (drafter/steps
    # 9 vs 10 at step 2). Steps 0-1 (and their samples) are decided without the clock.
    check_reference(first_run, "drafter", warm_tiny_model_dir, last_step=1, ignore=("drafter/", "rollout/spec/"))
