"""Packed attention on CUDA: every available varlen backend gives the padded log-probs and gradients; the learner
picks packed + triton by itself. Skipped without CUDA; run on the GPU machine: ``pytest tests/gpu -q``."""

import copy
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rl.types import TrainSample
from rl.algorithms import AlgorithmConfig
from trainers.batching import gather_response, make_micro_batches, move_micro_batch
from trainers.learner import Learner
from trainers.logprob import KernelChoice, token_logprobs
from trainers.settings import LearnerSettings
from trainers.packing import backend_unavailable, use_packed_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")
VOCAB = 1000


def _model(dtype):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=CUDA, dtype=dtype)


def _samples(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(1, VOCAB, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(1, VOCAB, (int(torch.randint(1, 200, (1,), generator=g)),), generator=g).tolist()
        out.append(TrainSample(p, r, [0.0] * len(r), advantage=float(i % 3) - 1.0, group_id=f"g{i}"))
    return out


def _run(model, samples, kernels):
    model.zero_grad(set_to_none=True)
    rows = [None] * len(samples)
    for mb in make_micro_batches(samples, 1024, packed=kernels.packed):
        mb = move_micro_batch(mb, CUDA)
        logp, _ = token_logprobs(model, mb, 0.9, kernels=kernels)
        (logp * mb.resp_mask).sum().backward()
        for i, row in zip(mb.index, gather_response(mb, samples, logp.detach().float().cpu())):
            rows[i] = row
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return [x for r in rows for x in r], grads


@pytest.mark.parametrize("backend,dtype,tol", [
    ("fa2_varlen", torch.bfloat16, 5e-2),
    ("torch_varlen", torch.bfloat16, 5e-2),
    ("sdpa_segments", torch.bfloat16, 5e-2),
    ("sdpa_segments", torch.float32, 1e-4),
])
def test_packed_equals_padded_on_cuda(backend, dtype, tol):
    why = backend_unavailable(backend, CUDA, dtype)
    if why:
        pytest.skip(why)
    base = _model(dtype)
    samples = _samples()
    want, want_grads = _run(base, samples, KernelChoice())
    packed = copy.deepcopy(base)
    use_packed_attention(packed, backend)
    got, grads = _run(packed, samples, KernelChoice(attention=backend))
    assert not any(math.isnan(x) for x in got)
    assert max(abs(a - b) for a, b in zip(got, want)) < tol
    assert torch.isfinite(grads).all()
    assert float((grads - want_grads).norm() / want_grads.norm()) < (2e-2 if dtype != torch.float32 else 1e-4)


def test_learner_auto_selects_fused_and_packed(tmp_path):
    _model(torch.bfloat16).save_pretrained(tmp_path)
    # param_dtype=bfloat16: parameters held in the compute dtype, no fp32 master copy
    cfg = LearnerSettings(lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=2048,
                          mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=1,
                          param_dtype="bfloat16")
    learner = Learner(str(tmp_path), cfg, AlgorithmConfig(policy_loss="ppo_clip"), temperature=1.0, dtype="bfloat16")
    assert learner.kernels.logprob == "triton"
    assert learner.kernels.packed, learner.kernels.describe()
    metrics = learner.train_step(_samples(8))
    assert not any(math.isnan(v) for v in metrics.values())
