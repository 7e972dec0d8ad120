"""DC-CoT through the real vLLM engine (CPU build): token-id requests with stop strings, the executor's parallel
workers, path lengths, loss masks, and the learner seeing each token in exactly the engine's context."""

import pytest
from transformers import AutoTokenizer

pytestmark = pytest.mark.integration


def test_generate_tokens_stops_limits_and_seeds(ray_local, dccot_model_dir):
    ray = ray_local
    from rl.data.dccot_arith import make_sum_problems
    from rollout.engine import Engine, SamplingSettings

    engine = ray.remote(Engine).options(num_cpus=1).remote(dccot_model_dir, seed=0, max_model_len=256)
    tok = AutoTokenizer.from_pretrained(dccot_model_dir)
    items = make_sum_problems(4, 7, "test")
    prompts = [tok(it.prompt, add_special_tokens=False)["input_ids"] for it in items]
    settings = SamplingSettings(temperature=1.0)
    out = ray.get(engine.generate_tokens.remote(prompts, [1, 2, 3, 4], [40, 40, 40, 3], [["<spawn_workers>"]] * 3 + [[]],
                                                settings))
    assert [r.prompt_token_ids for r in out] == prompts
    for r in out[:3]:  # the warm-started model opens a spawn block; the stop string stays in the output
        assert r.finish_reason == "stop" and r.response_text.endswith("<spawn_workers>")
        assert tok.decode(r.response_token_ids) == r.response_text
        assert len(r.logprobs) == len(r.response_token_ids)
    assert len(out[3].response_token_ids) == 3 and out[3].finish_reason == "length"
    again = ray.get(engine.generate_tokens.remote(prompts, [1, 2, 3, 4], [40, 40, 40, 3], [["<spawn_workers>"]] * 3 + [[]],
                                                  settings))
    assert [r.response_token_ids for r in again] == [r.response_token_ids for r in out]
    with pytest.raises(ValueError, match="4 prompts but 3 seeds"):
        ray.get(engine.generate_tokens.remote(prompts, [1, 2, 3], [4] * 4, [[]] * 4, settings))
    ray.kill(engine)


def test_executor_on_engine_masks_paths_and_learner_context(ray_local, dccot_model_dir):
    ray = ray_local
    from rl.data.dccot_arith import make_sum_problems
    from rl.dccot import DCCoTConfig
    from rollout.dccot import TrajectoryRequest, run_dccot, to_train_samples
    from rl.algorithms import AlgorithmConfig
    from rollout.engine import Engine, SamplingSettings
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    engine = ray.remote(Engine).options(num_cpus=1).remote(dccot_model_dir, seed=0, max_model_len=256)
    tok = AutoTokenizer.from_pretrained(dccot_model_dir)
    calls = []

    def generate_fn(prompts, seeds, max_tokens, stops):
        calls.append([s[0] for s in stops])
        return ray.get(engine.generate_tokens.remote(prompts, seeds, max_tokens, stops, SamplingSettings(temperature=1.0)))

    items = make_sum_problems(4, 11, "test")
    reqs = [TrajectoryRequest(it.id, tok(it.prompt, add_special_tokens=False)["input_ids"], seed=10 * i + j)
            for i, it in enumerate(items) for j in range(2)]
    cfg = DCCoTConfig(workers_per_block=3, max_spawn_blocks=2, max_worker_tokens=24, max_path_tokens=96,
                      max_total_tokens=160)
    trajs = run_dccot(generate_fn, lambda s: tok(s, add_special_tokens=False)["input_ids"], tok.decode, reqs, cfg)

    # Workers run as parallel requests: one call holds all workers of every spawning trajectory.
    spawned = [t for t in trajs if t.worker_blocks]
    assert len(spawned) >= 6, [t.response_text for t in trajs]
    assert calls[0] == ["<spawn_workers>"] * len(reqs)
    assert calls[1] == ["</worker_1>", "</worker_2>", "</worker_3>"] * len(spawned)
    texts = {w.text for t in spawned for w in t.worker_blocks[0]}
    assert len(texts) > 3  # different seeds: workers of a block are not copies of each other

    for t in spawned:
        # Longest path by hand: director segments (injected </spawn_workers> included) + the longest worker of
        # each block (its opener included); total: every worker.
        directors = [len(s.response_token_ids) - s.num_injected + (1 if s.block else 0) for s in t.director_segments]
        workers = [[len(w.response_token_ids) for w in ws] for ws in t.worker_blocks]
        assert t.path_lengths.longest_path_tokens == sum(directors) + sum(max(ws) for ws in workers)
        assert t.path_lengths.total_tokens == sum(directors) + sum(sum(ws) for ws in workers)
        # Loss masks: 1 exactly on the engine's sampled tokens, 0 on the injected ones.
        for s in t.segments:
            assert s.loss_mask == [0] * s.num_injected + [1] * (len(s.response_token_ids) - s.num_injected)
    samples = to_train_samples(trajs, [1.0] * len(trajs))
    sampled = sum(len(s.response_token_ids) - s.num_injected for t in trajs for s in t.segments)
    assert sum(sum(s.loss_mask) for s in samples) == sampled

    # Each trained token sits in exactly the context the engine sampled it in: the learner's log-probs on the
    # train samples reproduce the engine's behaviour log-probs (workers do not see their siblings; the director
    # sees the copies).
    settings = LearnerSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=4096,
                               mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=0)
    learner = Learner(dccot_model_dir, settings, AlgorithmConfig(policy_loss="ppo_clip"), temperature=1.0)
    got = learner.compute_logprobs(samples)
    worst = max(abs(g - b) for s, gs in zip(samples, got) for g, b, m in zip(gs, s.behaviour_logprobs, s.loss_mask) if m)
    assert worst < 1e-3
    # One director sample per trajectory, then one per worker, each with its own trajectory's id and advantage.
    tagged = to_train_samples(trajs, [float(i) for i in range(len(trajs))])
    want = [(t.prompt_id, float(i)) for i, t in enumerate(trajs) if t.segments
            for _ in range(1 + sum(len(ws) for ws in t.worker_blocks))]
    assert [(s.group_id, s.advantage) for s in tagged] == want
    ray.kill(engine)
