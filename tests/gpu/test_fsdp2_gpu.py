"""FSDP2 learner on CUDA (NCCL, one rank): the same update as the unsharded learner, with the fused kernels and
packing chosen by auto, in fp32 and with bf16 mixed precision (fp32 master weights, ``learner.param_dtype``, and
bf16 compute, ``model.dtype``); one step at a small learning rate moves the fp32 masters; the shard lives on the
GPU, the whole model does not. Skipped without CUDA; run on the GPU machine: ``pytest tests/gpu -q``."""


import pytest
import torch
from safetensors.torch import load as st_load

from rl.algorithms import AlgorithmConfig
from tests.learner_fixtures import free_port, random_samples, save_tiny_qwen2
from trainers import distributed as D
from trainers.learner import Learner
from trainers.settings import LearnerSettings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CFG = LearnerSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=256,
                      mini_batches_per_step=2, epochs_per_step=1, old_logprob_source="learner", num_gpus=1)
ALGO = AlgorithmConfig(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("fsdp_gpu_model"), vocab=1000, hidden=256, intermediate=512, heads=4,
                           kv_heads=2, max_len=512, tie=False)


def _samples(n=12, seed=0):
    return random_samples(n, seed, vocab=1000, prompt_len=(4, 40), response_len=(1, 60), behaviour=-5.0, group_size=6)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 2e-2)])
def test_fsdp2_one_rank_matches_single_on_cuda(model_dir, dtype, tol):
    """``dtype`` is FSDP2's compute dtype (model.dtype); its shard, gradients and AdamW state stay fp32 either way,
    and the reference is the unsharded learner all in fp32 (bf16 export: the masters rounded once)."""
    single = Learner(model_dir, CFG.replace(strategy="single", param_dtype="float32"), ALGO, temperature=1.0)
    want = single.train_step(_samples())
    want_w = st_load(single.export_weights())
    del single
    torch.cuda.empty_cache()
    port = free_port()
    sharded = Learner(model_dir, CFG.replace(strategy="fsdp2", param_dtype="float32"), ALGO,
                      temperature=1.0, dtype=dtype, rank=0, world_size=1, master=("127.0.0.1", port))
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



@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_fsdp2_fp32_masters_keep_a_small_step_on_cuda(model_dir, param_dtype):
    """One step at lr 1e-6 with bf16 compute under FSDP2 (NCCL, one rank): fp32 master weights change nearly every
    weight; stepped in bf16 (pure bf16) most such updates are below half a bf16 spacing and round away. The
    embedding is left out of the count: only the rows of the tokens in the batch get a gradient (about half of
    this vocabulary). tests/unit/test_mixed_precision.py measures the same on gloo."""
    cfg = CFG.replace(lr=1e-6, mini_batches_per_step=1, strategy="fsdp2", param_dtype=param_dtype)
    learner = Learner(model_dir, cfg, ALGO, temperature=1.0, dtype="bfloat16", rank=0, world_size=1,
                      master=("127.0.0.1", free_port()))
    try:
        names = [n for n, _ in learner.model.named_parameters() if "embed_tokens" not in n]
        before = {n: D.full_tensor(p.detach()).clone() for n, p in learner.model.named_parameters()}
        assert all(t.is_cuda for t in before.values())
        metrics = learner.train_step(_samples())
        after = {n: D.full_tensor(p.detach()) for n, p in learner.model.named_parameters()}
        changed = sum(int((after[n] != before[n]).sum()) for n in names) / sum(before[n].numel() for n in names)
        states = {v.dtype for s in learner.optimizer.state.values() for v in s.values()
                  if torch.is_tensor(v) and v.dim() > 0}
    finally:
        D.destroy()
    want = getattr(torch, param_dtype)
    assert {t.dtype for t in before.values()} == states == {want}
    if param_dtype == "float32":
        assert changed > 0.90, f"one step at lr 1e-6 changed only {changed:.2%} of the fp32 master weights"
    else:
        assert changed < 0.10, f"pure bf16: one step at lr 1e-6 changed {changed:.2%} of the weights"
    assert metrics["perf/learner_max_reserved_gib"] > 0
