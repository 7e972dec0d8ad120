"""The Triton log-prob kernel on CUDA against a float64 reference (bf16 and fp32 inputs), NaN-free, and its peak
memory against the naive path. Skipped without CUDA; run on the GPU machine: ``pytest tests/gpu -q``."""

import pytest
import torch

from trainers.fused_logprob import (
    IGNORE_INDEX,
    chunked_linear_logprobs,
    naive_linear_logprobs,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")


def _triton(*args, **kw):
    from trainers.fused_logprob import triton_linear_logprobs

    return triton_linear_logprobs(*args, **kw)


def _problem(t, h, v, n_masked, seed):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    hidden = torch.randn(t, h, generator=g, device=CUDA, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, device=CUDA, dtype=torch.float64) * (3.0 / h**0.5)
    targets = torch.randint(0, v, (t,), generator=g, device=CUDA)
    targets[:n_masked] = IGNORE_INDEX
    g_logp = torch.randn(t, generator=g, device=CUDA, dtype=torch.float64)
    g_ent = torch.randn(t, generator=g, device=CUDA, dtype=torch.float64)
    return hidden, weight, targets, g_logp, g_ent


def _run(fn, hidden, weight, targets, temperature, g_logp, g_ent, dtype):
    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    logp, ent = fn(h, w, targets, temperature)
    (logp.double() * g_logp + ent.double() * g_ent).sum().backward()
    return [logp.detach().double(), ent.detach().double(), h.grad.double(), w.grad.double()]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


SHAPES = [  # (T, H, V, temperature, masked rows)
    (1, 128, 1000, 1.0, 0),
    (333, 256, 32_003, 0.7, 17),
    (1024, 1536, 151_936, 1.0, 100),
    (77, 3584, 151_936, 0.6, 0),
]


@pytest.mark.parametrize("t,h,v,temperature,masked", SHAPES)
@pytest.mark.parametrize("kernel", ["triton", "chunked"])
def test_bf16_against_float64_reference(kernel, t, h, v, temperature, masked):
    hidden, weight, targets, g_logp, g_ent = _problem(t, h, v, masked, seed=t + h)
    # The reference sees the same bf16-rounded inputs: only the kernel's own rounding is measured.
    hidden, weight = hidden.bfloat16().double(), weight.bfloat16().double()
    ref = _run(naive_linear_logprobs, hidden, weight, targets, temperature, g_logp, g_ent, torch.float64)
    fn = _triton if kernel == "triton" else chunked_linear_logprobs
    got = _run(fn, hidden, weight, targets, temperature, g_logp, g_ent, torch.bfloat16)
    for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight"), got, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-2, (name, _rel(a, b))
    if masked:
        assert got[0][:masked].abs().max().item() == 0 and got[2][:masked].abs().max().item() == 0


@pytest.mark.parametrize("t,h,v,temperature,masked", SHAPES[:3])
def test_fp32_triton_is_exact(t, h, v, temperature, masked):
    hidden, weight, targets, g_logp, g_ent = _problem(t, h, v, masked, seed=5)
    ref = _run(naive_linear_logprobs, hidden, weight, targets, temperature, g_logp, g_ent, torch.float64)
    got = _run(_triton, hidden, weight, targets, temperature, g_logp, g_ent, torch.float32)
    for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight"), got, ref):
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))


def _peak_bytes(fn, hidden, weight, targets):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, ent = fn(h, w, targets, 1.0)
    (logp.sum() + 0.01 * ent.sum()).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_triton_peak_memory_far_below_naive():
    t, h, v = 4096, 1536, 151_936
    hidden = torch.randn(t, h, device=CUDA, dtype=torch.bfloat16)
    weight = torch.randn(v, h, device=CUDA, dtype=torch.bfloat16) * 0.02
    targets = torch.randint(0, v, (t,), device=CUDA)
    naive = _peak_bytes(naive_linear_logprobs, hidden, weight, targets)
    fused = _peak_bytes(_triton, hidden, weight, targets)
    assert naive > t * v * 4  # at least the fp32 logits
    assert fused < 0.5 * naive, (fused / 2**30, naive / 2**30)
