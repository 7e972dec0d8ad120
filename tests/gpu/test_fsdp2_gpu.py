"""FSDP2 learner on CUDA (NCCL, one rank): the same update as the unsharded learner, with the fused kernels and
packing chosen by auto, in fp32 and with bf16 mixed precision; the shard lives on the GPU, the whole model does not.
Skipped without CUDA; run on the GPU machine: ``pytest tests/gpu -q``."""


import pytest
import torch
from safetensors.torch import load as st_load

from tests.learner_fixtures import free_port, random_samples, save_tiny_qwen2
from trainers import distributed as D
from trainers.learner import Learner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CFG = dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=256,
           mini_batches_per_step=2, epochs_per_step=1, old_logprob_source="learner", num_gpus=1)
ALGO = dict(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("fsdp_gpu_model"), vocab=1000, hidden=256, intermediate=512, heads=4,
                           kv_heads=2, max_len=512, tie=False)


def _samples(n=12, seed=0):
    return random_samples(n, seed, vocab=1000, prompt_len=(4, 40), response_len=(1, 60), behaviour=-5.0, group_size=6)


@pytest.mark.parametrize("param_dtype,tol", [(None, 2e-5), ("bfloat16", 2e-2)])
def test_fsdp2_one_rank_matches_single_on_cuda(model_dir, param_dtype, tol):
    single = Learner(model_dir, {**CFG, "strategy": "single"}, ALGO, temperature=1.0)
    want = single.train_step(_samples())
    want_w = st_load(single.export_weights())
    del single
    torch.cuda.empty_cache()
    port = free_port()
    sharded = Learner(model_dir, {**CFG, "strategy": "fsdp2", "fsdp": {"param_dtype": param_dtype}}, ALGO,
                      temperature=1.0, rank=0, world_size=1, master=("127.0.0.1", port))
    try:
        assert sharded.kernels.packed and sharded.kernels.logprob in ("triton", "chunked")
        got = sharded.train_step(_samples())
        assert got["loss/policy"] == pytest.approx(want["loss/policy"], rel=tol, abs=tol)
        assert got["loss/grad_norm"] == pytest.approx(want["loss/grad_norm"], rel=10 * tol)
        got_w = st_load(sharded.export_weights())
        assert max(float((got_w[k].float() - want_w[k].float()).abs().max()) for k in want_w) < 10 * tol
        assert all(torch.isfinite(v).all() for v in got_w.values())
    finally:
        D.destroy()
