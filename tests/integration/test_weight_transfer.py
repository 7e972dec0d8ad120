"""The gloo weight transport (``sync.transport=gloo``) between a learner actor and a real vLLM CPU engine: the
engine serves exactly the weights an object-store sync gives it, and a sync that breaks off mid-way fails naming
the engine and the bucket, with the engine's version unchanged."""

import pytest

from rl.algorithms import AlgorithmConfig
from trainers.settings import LearnerSettings

pytestmark = pytest.mark.integration

LEARNER_CFG = LearnerSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=4096,
                              mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=0)
BUCKET_BYTES = 30_000  # the tiny model's embedding, each decoder layer, the norm and the tied head: 7 buckets


def _max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_gloo_sync_equals_object_store_and_breaks_off_cleanly(ray_local, tiny_model_dir):
    ray = ray_local
    from trainers.sync import LearnerGroup, WeightSyncError, init_weight_transfer, push_weights, push_weights_transfer
    from rollout.engine import Engine, GenerationRequest, SamplingSettings
    from trainers.learner import Learner

    class TestLearner(Learner):
        def perturb(self, scale: float, seed: int) -> None:
            import torch

            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g))

        stop_at: int | None = None

        def stop_sending_at(self, index: int) -> None:
            self.stop_at = index

        def send_weight_bucket(self, index: int) -> dict:
            """From bucket ``stop_at`` on, gather but never broadcast: a sender that broke off."""
            if self.stop_at is not None and index >= self.stop_at:
                self._next_bucket(index)
                return {"bytes": 0.0, "pack_s": 0.0, "send_s": 0.0, "gather_s": 0.0}
            return super().send_weight_bucket(index)

    engine = ray.remote(Engine).options(num_cpus=1).remote(tiny_model_dir, seed=0, max_model_len=256,
                                                            weight_transfer="gloo")
    actor = ray.remote(TestLearner).options(num_cpus=1).remote(tiny_model_dir, LEARNER_CFG,
                                                               AlgorithmConfig(policy_loss="ppo_clip"), temperature=1.0)
    learner = LearnerGroup([actor])
    ray.get([engine.ping.remote(), actor.ping.remote()])  # as the driver does: both up before the rendezvous
    init_weight_transfer(learner, [engine], 1, timeout_s=10.0)

    probe = [([5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18])]
    before = ray.get(engine.score_tokens.remote(probe))
    ray.get(actor.perturb.remote(0.02, 1))
    info = push_weights_transfer(learner, [engine], 1, BUCKET_BYTES)
    assert info["sync/buckets"] == 7 and info["sync/weight_version"] == 1
    assert ray.get(engine.ping.remote()) == 1 and ray.get(engine.worker_weight_versions.remote()) == [1]
    over_gloo = ray.get(engine.score_tokens.remote(probe))
    want = ray.get(actor.probe_logprobs.remote(probe))
    assert _max_diff(over_gloo, before) > 1e-2, "the engine still serves the old weights"
    assert _max_diff(over_gloo, want) < 1e-4, "canary: engine != learner after a gloo sync"

    # New weights over gloo, then the same weights through the object store and over gloo in one bucket: the
    # engine serves bit for bit the same model each time (identical log-probs).
    ray.get(actor.perturb.remote(0.02, 2))
    push_weights_transfer(learner, [engine], 2, BUCKET_BYTES)
    over_gloo = ray.get(engine.score_tokens.remote(probe))
    assert _max_diff(over_gloo, want) > 1e-3, "the second gloo sync loaded nothing"
    push_weights(learner, [engine], 3, BUCKET_BYTES)
    assert ray.get(engine.score_tokens.remote(probe)) == over_gloo
    push_weights_transfer(learner, [engine], 4, 0)
    assert ray.get(engine.score_tokens.remote(probe)) == over_gloo
    assert ray.get(engine.ping.remote()) == 4

    # A sender that stops after the second bucket: the engine's receive times out (transport_timeout_s=10 here).
    ray.get(actor.perturb.remote(0.05, 3))
    ray.get(actor.stop_sending_at.remote(2))
    with pytest.raises(WeightSyncError, match=r"at bucket 3/7 broke off on engine 0: .*did not arrive.*Timed out"):
        push_weights_transfer(learner, [engine], 5, BUCKET_BYTES)
    assert ray.get(engine.ping.remote()) == 4 and ray.get(engine.worker_weight_versions.remote()) == [4]
    with pytest.raises(Exception, match="weight sync broke off"):
        ray.get(engine.generate.remote([GenerationRequest("p", "Compute 1 + 2.", 1, seed=0)], SamplingSettings()))
    ray.kill(engine)
    ray.kill(actor)


def test_a_broken_sync_names_the_engine_that_failed_or_died(ray_local):
    """The driver's wait over a sync's calls: the first failure ends it, named by who failed (a task's error, or
    an actor that died mid-sync, as an engine whose worker crashed)."""
    ray = ray_local
    from trainers.sync import WeightSyncError, _wait_all

    @ray.remote(num_cpus=0)
    class Peer:
        def ok(self):
            return 1

        def fail(self):
            raise RuntimeError("recv timed out")

        def die(self):
            import os

            os._exit(1)

    a, b = Peer.remote(), Peer.remote()
    assert _wait_all([("engine 0", a.ok.remote()), ("engine 1", b.ok.remote())], "sync") == [1, 1]
    with pytest.raises(WeightSyncError, match=r"^sync at bucket 2/3 broke off on engine 1: RuntimeError: recv timed out$"):
        _wait_all([("engine 0", a.ok.remote()), ("engine 1", b.fail.remote())], "sync at bucket 2/3")
    with pytest.raises(WeightSyncError, match=r"^sync at bucket 2/3 broke off on engine 1: ActorDiedError"):
        _wait_all([("engine 0", a.ok.remote()), ("engine 1", b.die.remote())], "sync at bucket 2/3")
