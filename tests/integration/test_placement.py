"""Distributed learner and placement on CPU with the real vLLM and Ray: 2 learner ranks (gloo; FSDP2, and
DeepSpeed ZeRO-3) + 2 engine actors, colocated and disaggregated, a few steps each, the canary passing after every
sync; async mode at lag 0 reproduces sync mode, and at lag 1 (a GDRO run) overlaps generation with training, each
batch feeding the controller its own groups, and checkpoints keeping the sampler position from before a prefetched
batch; weight sync in buckets; a drafter trained data-parallel on the 2 learner ranks."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_algorithms_train import steps, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = ["run.num_steps=2", "rollout.prompts_per_step=4", "rollout.num_samples_per_prompt=4",
         "rollout.max_response_tokens=24", "data.eval.num_problems=8", "learner.micro_batch_tokens=256"]
TWO_BY_TWO = ["learner.num_ranks=2", "rollout.num_engines=2", "learner.torch_threads=1"]


# the disaggregated FSDP2 run also speculates with a drafter trained data-parallel on both learner ranks
DRAFTER = ["drafter.mode=fixed", "drafter.num_speculative_tokens=2", "drafter.train_max_steps=3",
           "drafter.batch_size=8", "rollout.enforce_eager=true"]


@pytest.mark.parametrize("mode,strategy", [("disaggregated", "fsdp2"), ("colocated", "fsdp2"),
                                           ("disaggregated", "deepspeed")])
def test_two_learner_ranks_two_engines(warm_tiny_model_dir, tmp_path, mode, strategy):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    drafter = mode == "disaggregated" and strategy == "fsdp2"
    m = train("configs/tiny_cpu.yaml", warm_tiny_model_dir, tmp_path / "run", *SMALL, *TWO_BY_TWO,
              f"learner.strategy={strategy}", f"placement.mode={mode}", "run.save_every_steps=2",
              "sync.bucket_mb=0.3",  # the tiny model's ~1 MB layers: one bucket per layer, gathered from shards
              *(DRAFTER if drafter else []))
    rows = steps(m)
    if drafter:
        assert rows[0]["drafter/steps"] == 0.0  # nothing captured before the first update
        assert rows[1]["drafter/steps"] == 3.0 and rows[1]["drafter/buffer_sequences"] == 16  # both ranks' shares
        assert all(r["perf/drafter_publish_s"] > 0 and r["rollout/logprob_abs_diff_max"] < 1e-3 for r in rows)
        assert (tmp_path / "run" / "checkpoints" / "step_000002" / "drafter_trainer.pt").is_file()
    assert len(rows) == 2
    for step, r in zip((1, 2), rows):
        assert r["sync/weight_version"] == step
        assert r["sync/canary_max_abs_diff"] < 1e-3  # both engines serve the gathered FSDP2 weights
        assert r["perf/weight_sync_s"] > 0
        assert r["sync/buckets"] >= 6  # embedding, 4 layers, norm + head
        if r["rollout/groups_all_equal_frac"] < 1.0:  # a step whose groups all agree has no signal and no gradient
            assert r["loss/grad_norm"] > 0
        assert r["async/policy_lag"] == 0.0
        if mode == "colocated":
            # vLLM's CPU build has no sleep mode: a sleep pauses the engine's scheduler until every tag is awake
            # again, so a canary run between the two wakes (the order that hangs on a GPU) fails here at once
            assert r["perf/engine_sleep_s"] > 0 and r["perf/engine_wake_s"] > 0
    assert any(r["loss/grad_norm"] > 0 for r in rows)
    assert m[0]["sync/canary_max_abs_diff"] < 1e-3
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "model" / "model.safetensors").is_file()


def test_async_lag_zero_reproduces_sync(warm_tiny_model_dir, tmp_path):
    base = [*SMALL, "run.num_steps=3"]
    sync = steps(train("configs/tiny_cpu.yaml", warm_tiny_model_dir, tmp_path / "sync", *base))
    lag0 = steps(train("configs/tiny_cpu.yaml", warm_tiny_model_dir, tmp_path / "lag0", *base,
                       "async_mode.enabled=true", "async_mode.max_off_policy_steps=0"))
    assert len(sync) == len(lag0) == 3
    for a, b in zip(sync, lag0):
        assert a["reward/mean"] == b["reward/mean"]  # the same samples
        assert a["rollout/response_len_mean"] == b["rollout/response_len_mean"]
        # TIS weights are exp(pi_old - pi_behaviour) ~ 1 (engine and learner agree to ~1e-6 in fp32)
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-4, abs=1e-6)
        assert b["async/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert b["async/policy_lag"] == 0.0 and b["async/overlap_generate_s"] == 0.0


def test_async_gdro_feeds_each_batch_its_own_groups_and_checkpoints_before_the_prefetch(warm_tiny_model_dir,
                                                                                       tmp_path):
    # 16 problems, 8 per step: step 3 draws step 1's prompts again. Step t+1's batch is prepared before step t's
    # GDRO update; the update must still see step t's groups (8 new prompts per step until all 16 are known).
    run = tmp_path / "run"
    m = train("configs/gdro_tiny_cpu.yaml", warm_tiny_model_dir, run, "run.num_steps=3", "rollout.prompts_per_step=8",
              "data.train.num_problems=16", "rollout.max_response_tokens=24", "run.save_every_steps=1",
              "run.keep_last_checkpoints=3",
              "async_mode.enabled=true", "async_mode.max_off_policy_steps=1")
    rows = steps(m)
    # lag 1: steps 2 and 3 are generated while the step before trains, and nothing is left after the last
    assert [r["async/policy_lag"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["async/overlap_generate_s"] > 0 and rows[1]["async/overlap_generate_s"] > 0
    assert rows[2]["async/overlap_generate_s"] == 0.0
    assert all(r["sync/canary_max_abs_diff"] < 1e-3 for r in rows)
    assert all(r["perf/sync_wait_s"] >= r["perf/weight_sync_s"] > 0 for r in rows)  # the push, then the canary
    assert [r["gdro/classifier/prompts_seen"] for r in rows] == [8.0, 16.0, 16.0]
    for r in rows:
        assert r["rollout/num_samples"] == 8 * 8 and r["gdro/rollout/budget_realized"] == pytest.approx(8.0)
        assert sum(v for k, v in r.items() if k.startswith("gdro/batch/prompts_bin")) == 8
    # Checkpoints 1 and 2 were written after the next batch's prompts were drawn: they keep the position before.
    for step, pos in ((1, 8), (2, 16)):
        state = json.loads((run / "checkpoints" / f"step_{step:06d}" / "driver_state.json").read_text())
        assert (state["sampler"]["epoch"], state["sampler"]["pos"]) == (0, pos), step
