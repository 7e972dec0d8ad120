"""The real vLLM engine (CPU build) in a Ray actor: generates, takes new weights, passes the canary."""

import pytest

from rl.types import TrainSample

pytestmark = pytest.mark.integration


def _max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_engine_generate_sync_canary(ray_local, tiny_model_dir):
    ray = ray_local
    from rl.algorithms import AlgorithmConfig
    from rollout.engine import Engine, GenerationRequest, SamplingSettings
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    # The one engine test of vLLM's compiled path with its core in a process of its own (the GPU defaults; on CPU
    # the other tests run eager, in-process engines): new weights must reach the compiled graph too.
    engine = ray.remote(Engine).options(num_cpus=1).remote(tiny_model_dir, seed=0, max_model_len=256,
                                                           enforce_eager=False, engine_core="process")
    assert ray.get(engine.engine_mode.remote()) == {"eager": False, "in_process": False, "runner": "v1"}
    settings = LearnerSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=4096,
                               mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=0)
    learner = Learner(tiny_model_dir, settings, AlgorithmConfig(policy_loss="ppo_clip"), temperature=0.7)

    reqs = [GenerationRequest("p0", "Compute 12 + 34.", 4, seed=1), GenerationRequest("p1", "Compute 7 * 8.", 4, seed=2)]
    settings = SamplingSettings(temperature=0.7, top_p=1.0, max_tokens=24)
    groups = ray.get(engine.generate.remote(reqs, settings))
    assert [len(g) for g in groups] == [4, 4]
    flat = [r for g in groups for r in g]
    assert all(len(r.logprobs) == len(r.response_token_ids) > 0 for r in flat)
    assert all(r.policy_version == 0 and r.finish_reason in ("stop", "length") for r in flat)
    # Same seeds, same samples.
    again = ray.get(engine.generate.remote(reqs, settings))
    assert [r.response_token_ids for g in again for r in g] == [r.response_token_ids for r in flat]

    # Behaviour log-probs (processed, after temperature) match the learner's recomputation.
    samples = [TrainSample(r.prompt_token_ids, r.response_token_ids, r.logprobs, 1.0 if i % 2 else -1.0, r.prompt_id)
               for i, r in enumerate(flat)]
    assert _max_diff(learner.compute_logprobs(samples), [r.logprobs for r in flat]) < 1e-3

    probe = [(r.prompt_token_ids, r.response_token_ids) for r in flat[:2]]
    before = ray.get(engine.score_tokens.remote(probe))
    assert _max_diff(before, learner.probe_logprobs(probe)) < 1e-3

    learner.train_step(samples)
    info = ray.get(engine.load_weights.remote(learner.export_weights(), 1))
    assert info["version"] == 1
    assert ray.get(engine.worker_weight_versions.remote()) == [1]
    after = ray.get(engine.score_tokens.remote(probe))
    assert _max_diff(after, before) > 1e-3, "the engine still serves the old weights"
    assert _max_diff(after, learner.probe_logprobs(probe)) < 1e-3, "canary: engine != learner after sync"
    new = ray.get(engine.generate.remote(reqs[:1], settings))
    assert new[0][0].policy_version == 1

    # The same sync in buckets of whole decoder layers (the driver's path): nothing changes until the last one.
    learner.train_step(samples)
    n = learner.begin_weight_export(30_000)
    assert n == 7  # embedding, 4 layers (each ~1 MB, over the bound: one bucket each), final norm, tied head copy
    for b in range(n):
        info = ray.get(engine.load_weight_bucket.remote(learner.next_weight_bucket(b), 2, b == n - 1))
        assert info["version"] == (2 if b == n - 1 else 1)
    assert ray.get(engine.worker_weight_versions.remote()) == [2]
    bucketed = ray.get(engine.score_tokens.remote(probe))
    assert _max_diff(bucketed, after) > 1e-3 and _max_diff(bucketed, learner.probe_logprobs(probe)) < 1e-3

    # Seeded requests whose prompts together exceed the engine's per-step token budget (4096): vLLM's CPU build
    # used to fail on chunked prefill of seeded requests ("CPU Generator does not use offset").
    long_prompt = "Problem: Compute 12 + 34. " * 14
    many = [GenerationRequest(f"l{i}", long_prompt, 1, seed=100 + i) for i in range(100)]
    out = ray.get(engine.generate.remote(many, SamplingSettings(temperature=1.0, top_p=1.0, max_tokens=2)))
    assert sum(len(g[0].prompt_token_ids) for g in out) > 4096 and all(len(g) == 1 for g in out)

    # The canary catches weights that are not the learner's.
    import torch

    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert _max_diff(ray.get(engine.score_tokens.remote(probe)), learner.probe_logprobs(probe)) > 1e-3
    ray.kill(engine)
