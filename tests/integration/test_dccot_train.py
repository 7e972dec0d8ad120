"""DC-CoT end to end on the tiny model (real vLLM, Ray, learner, graders): `rl train` in DC-CoT mode and
`rl eval --dccot`, with the latency measure reported next to accuracy."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.integration.test_algorithms_train import ROOT, steps, train
from tests.references import check_reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_dccot_train_with_cispo(dccot_model_dir, tmp_path):
    # The short-warm-start fixture is rarely right, so the correct-and-format filter would drop nearly every group:
    # dynamic sampling is off here (the filter runs in the recipe experiments, docs/benchmarks.md).
    m = train("configs/dccot_tiny_cpu_latency.yaml", dccot_model_dir, tmp_path / "run", "run.num_steps=2",
              "rollout.prompts_per_step=4", "rollout.num_samples_per_prompt=4",
              "rollout.dynamic_sampling.enabled=false", "algorithm.policy_loss=cispo",
              "async_mode.enabled=true", "async_mode.max_off_policy_steps=1")  # step 2 generated during step 1
    assert [m[s]["async/policy_lag"] for s in (1, 2)] == [0.0, 1.0]
    assert m[1]["async/overlap_generate_s"] > 0 and 0.0 < m[2]["async/tis_weight_mean"] <= 2.0
    for step in (0, 2):
        ev = m[step]
        assert ev["eval/num_problems"] == 16.0
        assert 0.0 <= ev["eval/accuracy"] <= 1.0 and 0.0 <= ev["eval/format_valid_frac"] <= 1.0
        assert 0 < ev["eval/longest_path_mean"] <= ev["eval/total_tokens_mean"]
    for r in steps(m):
        n_traj = r["rollout/num_trajectories"]
        assert n_traj == 4 * 4
        # one director sample per trajectory plus one per worker (3 per spawn block)
        assert r["rollout/num_samples"] == pytest.approx(n_traj * (1 + 3 * r["rollout/dccot/spawn_blocks_mean"]))
        assert 0 < r["rollout/dccot/longest_path_tokens_mean"] <= r["rollout/dccot/total_tokens_mean"]
        assert r["rollout/dccot/parallelism_mean"] >= 1.0
        assert r["reward/correct_and_format_frac"] <= r["reward/format_valid_frac"]
        assert math.isfinite(r["loss/policy"]) and "loss/clip_frac_high" in r
        assert r["sync/canary_max_abs_diff"] < 1e-3
    logged = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert logged and {"longest_path_tokens", "end_reason", "num_spawn_blocks"} <= set(logged[0])
    check_reference(tmp_path / "run", "dccot_async", dccot_model_dir)


def test_rl_eval_dccot_reports_longest_path_and_resumes(dccot_model_dir, tmp_path):
    from rl.data.dccot_arith import make_sum_problems
    from rl.dccot import response_format_valid

    data = tmp_path / "sums.jsonl"
    items = make_sum_problems(6, 5, "test")
    data.write_text("".join(json.dumps({"id": it.id, "problem": it.metadata["question"], "answer": it.answer}) + "\n"
                            for it in items))
    out = tmp_path / "eval"
    args = [sys.executable, "-m", "trainers.cli", "eval", "--model", dccot_model_dir, "--benchmarks", str(data), "--n", "2",
            "--max-tokens", "96", "--temperature", "1.0", "--top-p", "1.0", "--chat-template", "off",
            "--prompt-template", "Problem: {problem}\nSolution:\n<think>\n", "--chunk-problems", "4", "--dccot",
            "--dccot-max-spawn-blocks", "2", "--dccot-max-worker-tokens", "24", "--dccot-max-total-tokens", "160",
            "--out", str(out), "--no-progress", "--num-resamples", "50"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    recs = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(recs) == 12
    for r in recs:
        assert 0 < r["longest_path_tokens"] <= r["total_tokens"] == r["num_tokens"]
        # the record's flag is the grammar check of its own response (3 workers per block, at most 2 blocks)
        assert r["format_valid"] is response_format_valid(r["response"], 3, 2)
    summary = json.loads((out / "summary.json").read_text())
    res = summary["results"]["sums"]
    assert res["longest_path_mean"] == pytest.approx(sum(r["longest_path_tokens"] for r in recs) / 12)
    assert res["format_valid_rate"] == pytest.approx(sum(r["format_valid"] for r in recs) / 12)
    assert "longest path" in (out / "summary.md").read_text()
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "6 already done" in again.stdout
    assert len((out / "generations.jsonl").read_text().splitlines()) == 12
