"""A few `rl train` steps per algorithm recipe on the tiny CPU model (real vLLM, Ray, learner, math-verify):
the algorithm-specific metrics are present and say the algorithm did what its paper says."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.references import check_reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
FAST = ["run.progress=false", "data.eval.num_problems=16", "eval.num_samples=1", "eval.every_steps=0",
        "run.save_every_steps=0"]


def train(config: str, model_dir: str, out: Path, *overrides: str) -> dict[int, dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "trainers.cli", "train", config, f"run.output_dir={out}", f"model.path={model_dir}",
            "model.build_tiny=false", *FAST, *overrides]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def steps(metrics: dict[int, dict]) -> list[dict]:
    return [metrics[s] for s in sorted(metrics) if s > 0]


def test_dapo_filters_constant_groups_and_refills(warm_tiny_model_dir, tmp_path):
    m = train("configs/dapo_tiny_cpu.yaml", warm_tiny_model_dir, tmp_path / "run", "run.num_steps=3",
              "rollout.prompts_per_step=8", "rollout.dynamic_sampling.prompts_per_round=12")
    rows = steps(m)
    assert sum(r["dapo/filtered_group_frac"] for r in rows) > 0, "no all-equal group was filtered in 3 steps"
    for r in rows:
        assert 1 <= r["dapo/gen_rounds"] <= 4
        assert r["dapo/prompts_generated"] == 12 * r["dapo/gen_rounds"]
        if r["dapo/batch_fill_frac"] == 1.0:
            assert r["rollout/num_samples"] == 8 * 8  # truncated to exactly the batch
        assert r["rollout/groups_all_equal_frac"] == 0.0  # every kept group has mixed rewards
        assert 0.0 <= r["loss/clip_frac_high"] <= 1.0 and 0.0 <= r["loss/clip_frac_low"] <= 1.0
        assert -1.0 <= r["shaping/overlong_penalty_mean"] <= 0.0
    check_reference(tmp_path / "run", "dapo", warm_tiny_model_dir)


def test_sapo_gates_softly_and_benchmarks_validate_in_training(warm_tiny_model_dir, tmp_path):
    # In-training validation on a benchmark file with `rl eval`'s statistics (eval.benchmarks).
    bench = tmp_path / "arith6.jsonl"
    bench.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"Compute {a} + {b}.", "answer": str(a + b)}) + "\n"
                             for i, (a, b) in enumerate([(12, 34), (7, 8), (40, 41), (23, 19), (55, 11), (9, 90)])))
    # tau = 1000 (the recipe's is 1): the gate w = 4 p (1 - p) = sech^2(tau (r - 1) / 2) then moves clearly with the
    # ratios of the later mini-batches: a ratio 0.5% off 1 gives w = sech^2(2.5) = 0.027 (with tau = 1: 0.999994).
    m = train("configs/sapo_tiny_cpu.yaml", warm_tiny_model_dir, tmp_path / "run", "run.num_steps=2",
              f"eval.benchmarks=[{bench}]", "eval.num_samples=2",
              'eval.benchmark_template="Problem: {problem}\\nSolution:\\n"',
              "algorithm.sapo_tau_pos=1000", "algorithm.sapo_tau_neg=1000")
    for step in (0, 2):
        r = m[step]
        assert r["eval/arith6/num_problems"] == 6.0
        assert 0.0 <= r["eval/arith6/pass@1"] <= r["eval/arith6/pass@2"] <= 1.0
        assert r["eval/arith6/pass@2_ci_low"] <= r["eval/arith6/pass@2"] <= r["eval/arith6/pass@2_ci_high"]
        assert r["eval/arith6/mean@2"] == pytest.approx(r["eval/arith6/pass@1"])
    for r in steps(m):
        # gate_mean is the mean over the step's 4 mini-batches of each one's mean w, and w is in (0, 1]. The first
        # mini-batch is on-policy (r = 1: w = 1 on every token), so gate_mean >= 1/4. In the later ones the tokens
        # whose probability moves get w ~ 0 and the near-certain ones keep w ~ 1, so gate_mean ~ 1 - 3/4 * (share
        # of moving tokens): measured 0.862 and 0.869 (tau 200: 0.876, 0.897); tau = 1 gives 0.9986 and 0.9998.
        assert 0.25 - 1e-6 <= r["loss/gate_mean"] <= 0.95
        assert r["loss/clip_frac"] == 0.0  # no hard clipping
        assert math.isfinite(r["loss/policy"])
    check_reference(tmp_path / "run", "sapo", warm_tiny_model_dir)


def test_gdro_varies_n_per_prompt_within_the_budget(warm_tiny_model_dir, tmp_path):
    # 16 distinct problems, 8 per step: prompts come back every 2 steps, so the classifier knows their bins.
    run = tmp_path / "run"
    m = train("configs/gdro_tiny_cpu.yaml", warm_tiny_model_dir, run, "run.num_steps=4", "rollout.prompts_per_step=8",
              "data.train.num_problems=16", "run.save_every_steps=2")
    rows = steps(m)
    for r in rows:
        assert r["rollout/num_samples"] == 8 * 8, "Rollout-GDRO must hold the mean budget of 8 per prompt"
        assert r["gdro/rollout/budget_realized"] == pytest.approx(8.0)
        weights = [v for k, v in r.items() if k.startswith("gdro/prompt/weight_bin")]
        assert weights and all(0.0 <= w <= 15.0 for w in weights)
    assert rows[0]["rollout/samples_per_prompt_min"] == rows[0]["rollout/samples_per_prompt_max"] == 8  # unseen
    varied = [r for r in rows[2:] if r["rollout/samples_per_prompt_min"] < r["rollout/samples_per_prompt_max"]]
    assert varied, "once prompts have bins, n per prompt should vary"
    state = json.loads((run / "checkpoints" / "step_000004" / "driver_state.json").read_text())
    assert state["gdro"], "the GDRO controller state must be in the checkpoint"

    # The controller survives resume: from the step-2 checkpoint, steps 3-4 make the same decisions.
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("step_000004", "tb"))
    resumed = train("configs/gdro_tiny_cpu.yaml", warm_tiny_model_dir, copy, "run.num_steps=4",
                    "rollout.prompts_per_step=8", "data.train.num_problems=16", "run.save_every_steps=2", "--resume")
    for step in (3, 4):
        for key in [k for k in m[step] if k.startswith(("gdro/", "rollout/samples_per_prompt", "reward/accuracy"))]:
            assert resumed[step][key] == pytest.approx(m[step][key], rel=1e-6, abs=1e-9), (step, key)
    check_reference(run, "gdro", warm_tiny_model_dir)


def test_differential_smoothing_shapes_advantages_with_kl_in_the_reward(warm_tiny_model_dir, tmp_path):
    # Also a KL penalty in the reward (PPO style, k3 >= 0): zero while the policy is the reference, then positive.
    m = train("configs/ds_tiny_cpu.yaml", warm_tiny_model_dir, tmp_path / "run", "run.num_steps=2",
              "algorithm.kl_coef=0.1", "algorithm.kl_in=reward", "algorithm.kl_estimator=k3")
    rows = steps(m)
    for r in rows:
        assert r["ds/term_abs_mean"] > 0.0
        assert math.isfinite(r["ds/term_to_adv_ratio"]) and r["ds/term_to_adv_ratio"] > 0.0
        assert r["loss/kl"] == 0.0  # the KL is in the reward, not in the loss
    assert rows[0]["kl/reward_penalty_mean"] == pytest.approx(0.0, abs=1e-4)
    assert rows[1]["kl/reward_penalty_mean"] > rows[0]["kl/reward_penalty_mean"]
    check_reference(tmp_path / "run", "ds", warm_tiny_model_dir)


def test_gigpo_finds_anchor_groups_in_multi_turn_episodes(warm_tiny_model_dir, tmp_path):
    # In async mode (lag 1): step 2's episodes are played while the learner trains on step 1's.
    m = train("configs/gigpo_tiny_cpu.yaml", warm_tiny_model_dir, tmp_path / "run", "run.num_steps=2",
              "kind.groups_per_step=4", "kind.eval_groups=8",
              "async_mode.enabled=true", "async_mode.max_off_policy_steps=1")
    rows = steps(m)
    assert [r["async/policy_lag"] for r in rows] == [0.0, 1.0]
    assert rows[0]["async/overlap_generate_s"] > 0 and rows[1]["async/overlap_generate_s"] == 0.0
    for r in rows:
        assert r["sync/canary_max_abs_diff"] < 1e-3 and 0.0 < r["async/tis_weight_mean"] <= 2.0
        assert r["rollout/num_episodes"] == 4 * 8
        assert r["gigpo/anchor_group_size_mean"] > 1.0
        assert r["gigpo/anchored_step_frac"] > 0.0
        assert 0.0 <= r["gigpo/step_adv_share"] <= 1.0
        assert r["gigpo/num_steps"] == r["rollout/num_steps"] >= r["rollout/num_episodes"]
    check_reference(tmp_path / "run", "gigpo_async", warm_tiny_model_dir)
