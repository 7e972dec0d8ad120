"""DeepSpeed ZeRO-3 learner on CUDA (NCCL, one rank): the same update as the unsharded learner, with the naive head
and with a fused log-prob kernel, and with the optimizer state offloaded to host memory; the model is partitioned
from host memory (the whole model never sits on the GPU). The CPU/gloo checks with 2 ranks and checkpoints are in
tests/unit/test_deepspeed.py. Skipped without CUDA; run on the GPU machine: ``pytest tests/gpu -q``."""


import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")

from safetensors.torch import load as st_load

from rl.algorithms import AlgorithmConfig
from tests.learner_fixtures import free_port, random_samples, save_tiny_qwen2
from trainers import distributed as D
from trainers.learner import Learner, learner_class
from trainers.logprob import KernelChoice
from trainers.settings import LearnerSettings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# padded + naive at start-up; the tests set the fused kernel afterwards
CFG = LearnerSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=256,
                      mini_batches_per_step=2, epochs_per_step=1, old_logprob_source="learner", num_gpus=1,
                      kernels={"logprob": "naive", "attention": "padded"})
ALGO = AlgorithmConfig(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean",
                       kl_coef=0.05, kl_in="loss", kl_estimator="k3")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("ds_gpu_model"), vocab=1000, hidden=256, intermediate=512, heads=4,
                           kv_heads=2, max_len=512, tie=True)


def _samples(n=12, seed=0):
    return random_samples(n, seed, vocab=1000, prompt_len=(4, 40), response_len=(1, 60), behaviour=-5.0, group_size=6)


@pytest.fixture(scope="module")
def single(model_dir):
    learner = Learner(model_dir, CFG.replace(strategy="single"), ALGO, temperature=1.0)
    want = learner.train_step(_samples())
    weights = st_load(learner.export_weights())
    del learner
    torch.cuda.empty_cache()
    return want, weights


@pytest.fixture(scope="module")
def master():
    """One process group for the module: DeepSpeed keeps handles to the group it first saw, so the group is not
    torn down between learners (as in a learner rank, which holds one group for its life)."""
    port = free_port()
    yield ("127.0.0.1", port)
    D.destroy()


@pytest.mark.parametrize("logprob,offload", [("naive", False), ("chunked", False), ("chunked", True)])
def test_deepspeed_one_rank_matches_single_on_cuda(model_dir, single, master, logprob, offload):
    want, want_w = single
    cfg = CFG.replace(strategy="deepspeed", deepspeed={"param_persistence_threshold": 0, "offload_optimizer": offload})
    learner = learner_class("deepspeed")(model_dir, cfg, ALGO, temperature=1.0, rank=0, world_size=1, master=master)
    assert next(learner.model.parameters()).numel() == 0  # partitioned: the whole tensor is gathered on use
    learner.kernels = KernelChoice(logprob=logprob)
    got = learner.train_step(_samples())
    for key in ("loss/policy", "loss/kl", "loss/total"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=2e-5), key
    assert got["loss/grad_norm"] == pytest.approx(want["loss/grad_norm"], rel=1e-3)
    got_w = st_load(learner.export_weights())
    assert max(float((got_w[k] - want_w[k]).abs().max()) for k in want_w) < 2e-4
