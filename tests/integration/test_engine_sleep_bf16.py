"""A bf16 vLLM engine (CPU build) against a learner computing in bf16 with fp32 master weights: the canary's gap
and its per-dtype bounds; and the CPU stand-in for sleep mode, a real pause of vLLM's scheduler held until every
tag is awake, as on a GPU."""

import threading
import time

import pytest
import torch

from rl.algorithms import AlgorithmConfig
from rl.config_runtime import CANARY_BOUNDS
from trainers.sync import canary_gap
from trainers.settings import LearnerSettings

pytestmark = pytest.mark.integration

LEARNER_CFG = LearnerSettings(lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=4096,
                              mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=0,
                              param_dtype="float32")


@pytest.fixture(scope="module")
def bf16_engine(tiny_model_dir):
    from rollout.engine import Engine

    engine = Engine(tiny_model_dir, dtype="bfloat16", seed=0, max_model_len=256, enforce_eager=True,
                    enable_sleep_mode=True, engine_core="process")  # vLLM's thread binding stays out of pytest
    yield engine
    del engine


def _probe(engine):
    from rollout.engine import GenerationRequest, SamplingSettings

    reqs = [GenerationRequest(f"p{i}", f"Compute {i} + {3 * i}.", 2, seed=i) for i in range(6)]
    groups = engine.generate(reqs, SamplingSettings(temperature=1.0, max_tokens=24))
    return [(r.prompt_token_ids, r.response_token_ids) for g in groups for r in g]


def test_bf16_canary_bounds(bf16_engine, tiny_model_dir):
    from trainers.learner import Learner

    probe = _probe(bf16_engine)
    learner = Learner(tiny_model_dir, LEARNER_CFG, AlgorithmConfig(policy_loss="ppo_clip"), temperature=1.0,
                      dtype="bfloat16")
    assert next(learner.model.parameters()).dtype == torch.float32  # fp32 masters, bf16 compute
    mean, largest = canary_gap(learner.probe_logprobs(probe), bf16_engine.score_tokens(probe))
    bf16_mean, bf16_max = CANARY_BOUNDS["bfloat16"]
    fp32_mean, fp32_max = CANARY_BOUNDS["float32"]
    # the same weights: within bf16's bounds, and far outside fp32's (a run with an fp32-only bound stopped at step 0)
    assert 3 * mean < bf16_mean and 3 * largest < bf16_max
    assert mean > fp32_mean and largest > fp32_max
    # weights that are not the learner's (noise of 30% of each tensor's spread) are caught in bf16 too; a drift as
    # small as one step's is not: in bf16 the canary catches wrong or garbled weights, not a missed small update
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    wrong_mean, wrong_max = canary_gap(learner.probe_logprobs(probe), bf16_engine.score_tokens(probe))
    assert wrong_mean > bf16_mean or wrong_max > bf16_max


def test_sleep_holds_the_scheduler_until_every_tag_is_awake(bf16_engine):
    """The order of a colocated step: sleep, (train), wake weights, push, wake KV cache, generate. On the CPU build
    a sleep is vLLM's own scheduler pause (level 0), released by vLLM only once every tag is awake again."""
    from vllm import SamplingParams

    engine = bf16_engine
    probe = _probe(engine)[:1]
    assert not engine.sleep_supported()  # the CPU build frees nothing; it pauses
    assert engine.sleep(2) > 0 and engine.asleep == {"weights", "kv_cache"}
    assert engine.wake_up(["weights"]) > 0 and engine.asleep == {"kv_cache"}
    # the engine refuses to generate half awake, naming what is still asleep ...
    with pytest.raises(RuntimeError, match=r"\['kv_cache'\] is asleep"):
        engine.score_tokens(probe)
    # ... because vLLM's paused scheduler would hold the request: a direct generate does not come back
    box = {}
    worker = threading.Thread(
        target=lambda: box.setdefault("out", engine.llm.generate("Compute 1 + 1.", SamplingParams(max_tokens=2),
                                                                 use_tqdm=False)), daemon=True)
    worker.start()
    worker.join(8.0)
    assert worker.is_alive() and "out" not in box, "a half-awake engine generated: the pause is not real"
    t0 = time.perf_counter()
    engine.wake_up(["kv_cache"])
    worker.join(60.0)
    assert not worker.is_alive() and len(box["out"]) == 1
    assert engine.asleep == set() and time.perf_counter() - t0 < 60
    assert len(engine.score_tokens(probe)[0]) == len(probe[0][1])
    assert engine.wake_up(["weights"]) == 0.0  # awake: nothing to do
