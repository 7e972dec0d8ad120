"""Fused linear log-prob/entropy (trainers.fused_logprob): the chunked path against a float64 reference, a
hand-computed case, ignore-index masking, bf16, tied heads, input errors, the Triton kernels under the Triton
interpreter (CPU), and the learner's start-up self-check of the chosen kernels (its fallbacks and tolerance)."""

import math
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rl.types import TrainSample
from trainers.fused_logprob import (
    IGNORE_INDEX,
    LOGPROB_KERNELS,
    ChunkedLinearLogprob,
    auto_chunk_size,
    chunked_linear_logprobs,
    logprob_kernel_unavailable,
    naive_linear_logprobs,
)
from trainers.batching import make_micro_batches
from trainers.logprob import KernelChoice, apply_kernels, token_logprobs

ROOT = Path(__file__).resolve().parents[2]


def _problem(t, h, v, n_masked=0, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * scale / math.sqrt(h) * 3
    targets = torch.randint(0, v, (t,), generator=g)
    if n_masked:
        targets[torch.randperm(t, generator=g)[:n_masked]] = IGNORE_INDEX
    g_logp = torch.randn(t, generator=g, dtype=torch.float64)
    g_ent = torch.randn(t, generator=g, dtype=torch.float64)
    return hidden, weight, targets, g_logp, g_ent


def _run(fn, hidden, weight, targets, temperature, g_logp, g_ent, dtype, **kw):
    """Forward + backward of sum(g_logp * logp + g_ent * ent): (logp, ent, d hidden, d weight) in float64."""
    h = hidden.detach().to(dtype).clone().requires_grad_()
    w = weight.detach().to(dtype).clone().requires_grad_()
    logp, ent = fn(h, w, targets, temperature, **kw)
    (logp.double() * g_logp + ent.double() * g_ent).sum().backward()
    return logp.double(), ent.double(), h.grad.double(), w.grad.double()


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize(
    "t,h,v,chunk,temperature,n_masked",
    [
        (1, 8, 11, None, 1.0, 0),        # T=1
        (37, 16, 101, 8, 0.7, 5),        # T not a multiple of the chunk, odd V, masked rows
        (64, 32, 257, 64, 1.3, 0),       # one exact chunk
        (50, 24, 1000, 7, 0.6, 49),      # all but one row masked
        (19, 12, 33, 1, 2.0, 3),         # one row per chunk
    ],
)
def test_chunked_matches_float64_reference(t, h, v, chunk, temperature, n_masked):
    hidden, weight, targets, g_logp, g_ent = _problem(t, h, v, n_masked, seed=t + v)
    ref = _run(naive_linear_logprobs, hidden, weight, targets, temperature, g_logp, g_ent, torch.float64)
    got = _run(chunked_linear_logprobs, hidden, weight, targets, temperature, g_logp, g_ent, torch.float32,
               chunk_size=chunk)
    for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight"), got, ref):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


def test_random_shapes_sweep():
    """More random shapes (including chunk sizes that do not divide T), fp32 vs float64, all four outputs."""
    g = torch.Generator().manual_seed(7)
    for trial in range(6):
        t, h, v = (int(x) for x in (torch.randint(1, 60, (1,), generator=g), torch.randint(4, 40, (1,), generator=g),
                                    torch.randint(2, 700, (1,), generator=g)))
        chunk = int(torch.randint(1, 70, (1,), generator=g))
        temperature = float(torch.empty(1).uniform_(0.5, 1.5, generator=g))
        hidden, weight, targets, g_logp, g_ent = _problem(t, h, v, n_masked=t // 4, seed=100 + trial)
        ref = _run(naive_linear_logprobs, hidden, weight, targets, temperature, g_logp, g_ent, torch.float64)
        got = _run(chunked_linear_logprobs, hidden, weight, targets, temperature, g_logp, g_ent, torch.float32,
                   chunk_size=chunk)
        for a, b in zip(got, ref):
            assert _rel(a, b) < 1e-5, (t, h, v, chunk)


def test_gradcheck_float64_both_outputs():
    hidden, weight, targets, _, _ = _problem(6, 4, 9, n_masked=1, seed=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ChunkedLinearLogprob.apply(a, b, targets, 0.8, IGNORE_INDEX, 4),
                                    (h, w))


def test_hand_computed_case():
    """H=1: logits [0, ln 2] give p = [1/3, 2/3].
    logp(target 1) = ln(2/3); entropy = ln 3 - (2/3) ln 2.
    d logp/dz = [-1/3, 1/3]  -> d h = (1/3) ln 2,  d W = [[-1/3], [1/3]] (h = 1).
    d ent/dz = -p (log p + ent) = [2 ln2 / 9, -2 ln2 / 9]  -> d h = -2 (ln 2)^2 / 9,  d W = [[2 ln2/9], [-2 ln2/9]]."""
    ln2, ln3 = math.log(2), math.log(3)
    for which, dh, dw in (("logp", ln2 / 3, [-1 / 3, 1 / 3]), ("ent", -2 * ln2**2 / 9, [2 * ln2 / 9, -2 * ln2 / 9])):
        h = torch.tensor([[1.0]], requires_grad=True)
        w = torch.tensor([[0.0], [ln2]], requires_grad=True)
        logp, ent = chunked_linear_logprobs(h, w, torch.tensor([1]), 1.0)
        assert logp.item() == pytest.approx(math.log(2 / 3), abs=1e-6)
        assert ent.item() == pytest.approx(ln3 - 2 / 3 * ln2, abs=1e-6)
        (logp if which == "logp" else ent).sum().backward()
        assert h.grad.item() == pytest.approx(dh, abs=1e-6)
        assert w.grad.flatten().tolist() == pytest.approx(dw, abs=1e-6)


def test_temperature_divides_logits():
    hidden, weight, targets, _, _ = _problem(5, 8, 20, seed=1)
    a, ea = chunked_linear_logprobs(hidden.float(), weight.float(), targets, 0.5)
    b, eb = chunked_linear_logprobs(hidden.float() * 2, weight.float(), targets, 1.0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ea, eb)


def test_ignored_rows_are_zero_and_get_no_gradient():
    hidden, weight, targets, g_logp, g_ent = _problem(10, 8, 30, seed=2)
    targets[[2, 7]] = IGNORE_INDEX
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logp, ent = chunked_linear_logprobs(h, w, targets, 0.9, chunk_size=3)
    assert logp[[2, 7]].tolist() == [0.0, 0.0] and ent[[2, 7]].tolist() == [0.0, 0.0]
    (logp * g_logp.float() + ent * g_ent.float()).sum().backward()
    assert h.grad[[2, 7]].abs().max() == 0
    # dW equals the dW of the same problem without the ignored rows.
    keep = targets != IGNORE_INDEX
    w2 = weight.float().requires_grad_()
    lp2, en2 = chunked_linear_logprobs(hidden.float()[keep], w2, targets[keep], 0.9)
    (lp2 * g_logp.float()[keep] + en2 * g_ent.float()[keep]).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_logprob_only_backward_matches_reference():
    """The entropy output unused (its grad is None): the cheaper backward branch."""
    hidden, weight, targets, g_logp, _ = _problem(23, 16, 77, n_masked=3, seed=4)
    zero = torch.zeros_like(g_logp)
    ref = _run(naive_linear_logprobs, hidden, weight, targets, 1.1, g_logp, zero, torch.float64)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logp, _ = chunked_linear_logprobs(h, w, targets, 1.1, chunk_size=5)
    (logp.double() * g_logp).sum().backward()
    assert _rel(h.grad.double(), ref[2]) < 1e-5 and _rel(w.grad.double(), ref[3]) < 1e-5


def test_bf16_inputs_fp32_outputs_close():
    hidden, weight, targets, g_logp, g_ent = _problem(40, 64, 500, n_masked=4, seed=5)
    # The reference sees the same bf16-rounded inputs, so only the kernel's own rounding is measured.
    hidden, weight = hidden.bfloat16().double(), weight.bfloat16().double()
    ref = _run(naive_linear_logprobs, hidden, weight, targets, 0.8, g_logp, g_ent, torch.float64)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    logp, ent = chunked_linear_logprobs(h, w, targets, 0.8, chunk_size=16)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    (logp.double() * g_logp + ent.double() * g_ent).sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    for a, b in zip((logp.double(), ent.double(), h.grad.double(), w.grad.double()), ref):
        assert torch.isfinite(a).all()
        assert _rel(a, b) < 2e-2


def test_tied_head_accumulates_both_uses():
    """A tied LM head: the weight is also the embedding that produced the hidden states."""
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(40, 16, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 40, (12,), generator=g)
    targets = torch.randint(0, 40, (12,), generator=g)

    def grad(fn, dtype):
        w = emb.to(dtype).requires_grad_()
        hidden = torch.tanh(w[ids] * 1.5)
        logp, ent = fn(hidden, w, targets, 0.9)
        (logp.sum() + 0.1 * ent.sum()).backward()
        return w.grad.double()

    assert _rel(grad(chunked_linear_logprobs, torch.float32), grad(naive_linear_logprobs, torch.float64)) < 1e-5


def test_forward_matches_naive_at_response_scale():
    """Larger logits (peaked distributions): entropies near 0 stay accurate."""
    hidden, weight, targets, _, _ = _problem(16, 32, 300, seed=8, scale=8.0)
    ref_lp, ref_ent = naive_linear_logprobs(hidden, weight, targets, 1.0)
    lp, ent = chunked_linear_logprobs(hidden.float(), weight.float(), targets, 1.0, chunk_size=5)
    assert _rel(lp.double(), ref_lp) < 1e-5
    assert (ent.double() - ref_ent).abs().max() < 1e-4


def test_empty_input():
    w = torch.randn(7, 4, requires_grad=True)
    h = torch.zeros(0, 4, requires_grad=True)
    logp, ent = chunked_linear_logprobs(h, w, torch.zeros(0, dtype=torch.long), 1.0)
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert w.grad.abs().max() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=torch.tensor([0, 9])), r"targets outside \[0, 7\)"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(weight=torch.randn(7, 5)), "shape mismatch"),
        (dict(weight=torch.randn(7, 4, dtype=torch.float64)), "cast one of them"),
        (dict(chunk_size=-1), "chunk_size must be >= 1"),
    ],
)
def test_bad_inputs_fail_clearly(kwargs, match):
    args = dict(hidden=torch.randn(2, 4), weight=torch.randn(7, 4), targets=torch.tensor([0, 1]), temperature=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        chunked_linear_logprobs(**args)


def test_auto_chunk_size_and_registry():
    assert auto_chunk_size(151936) * 151936 <= 1 << 25 and auto_chunk_size(151936) % 16 == 0
    assert auto_chunk_size(50) == 8192
    assert LOGPROB_KERNELS.names() == ["chunked", "naive", "triton"]
    assert LOGPROB_KERNELS.capabilities("naive")["full_logits"]
    assert "needs CUDA" in logprob_kernel_unavailable("triton", torch.device("cpu"))
    assert logprob_kernel_unavailable("chunked", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="Did you mean 'chunked'"):
        logprob_kernel_unavailable("chunkd", torch.device("cpu"))


def test_learner_modules_do_not_import_triton():
    code = ("import sys, trainers.learner, trainers.logprob, trainers.fused_logprob; "
            "assert 'trainers.triton_logprob' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


_INTERPRETED = r"""
import os, sys, torch
from trainers.fused_logprob import naive_linear_logprobs, IGNORE_INDEX
from trainers.triton_logprob import triton_linear_logprobs
g = torch.Generator().manual_seed(0)
worst = 0.0
# (150, 16, 40): 10 row blocks of 16, more than one group of backward programs (the last one partial)
for t, h, v, temp, masked in [(1, 16, 23, 1.0, 0), (37, 40, 101, 0.7, 4), (20, 16, 64, 1.3, 19),
                              (150, 16, 40, 0.9, 7)]:
    hid = torch.randn(t, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.4
    tgt = torch.randint(0, v, (t,), generator=g)
    tgt[:masked] = IGNORE_INDEX
    g1, g2 = torch.randn(t, generator=g, dtype=torch.float64), torch.randn(t, generator=g, dtype=torch.float64)
    outs = []
    for fn, dt, kw in ((naive_linear_logprobs, torch.float64, {}),
                       (triton_linear_logprobs, torch.float32, dict(block_t=16, block_v=16, block_h=16))):
        a, b = hid.to(dt).clone().requires_grad_(), w.to(dt).clone().requires_grad_()
        lp, en = fn(a, b, tgt, temp, IGNORE_INDEX, **kw)
        (lp.double() * g1 + en.double() * g2).sum().backward()
        outs.append([lp.detach().double(), en.detach().double(), a.grad.double(), b.grad.double()])
    for x, y in zip(*reversed(outs)):
        assert torch.isfinite(x).all()
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp(min=1e-30)))
print(worst)
assert worst < 1e-5, worst
"""


@pytest.mark.slow
@pytest.mark.skipif(find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_interpreter():
    """The Triton kernels run by Triton's CPU interpreter (TRITON_INTERPRET=1): several row blocks, vocabulary
    splits and tiles, partial tiles, masked rows; fp32 vs the float64 reference. Checks the kernels' indexing and
    math, not GPU compilation or speed (tests/gpu does that)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=ROOT, env=env, check=True, timeout=300)


# ---------------------------------------------------------------- the learner's start-up self-check
# apply_kernels probes the chosen kernels against padded attention + the model's own head. "triton" cannot run
# on CPU, so these tests stand a torch function in for it (through the kernel registry) and break it, or the
# packed attention, on purpose.

_CPU = torch.device("cpu")


def _tiny_qwen2(dtype=torch.float32, head_scale=None):
    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    if head_scale is not None:  # large logits: |z| up to ~head_scale * 20
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, head_scale)
    return model.to(dtype)


def _fp32_math_kernel(shift=0.0):
    """A stand-in for the Triton kernel: logits in fp32 from the 16-bit inputs (no rounding of the logits to the
    input dtype, as Triton's fp32 accumulators), plus ``shift`` on every log-prob (a broken kernel when != 0)."""

    def kernel(hidden, weight, targets, temperature, ignore_index, chunk_size):
        logp, ent = chunked_linear_logprobs(hidden.float(), weight.float(), targets, temperature, ignore_index)
        return logp + shift * (targets != ignore_index), ent

    return kernel


@pytest.fixture
def fake_triton(monkeypatch):
    """``install(kernel)``: LOGPROB_KERNELS.get("triton") returns ``kernel`` for the rest of the test."""
    real_get = LOGPROB_KERNELS.get

    def install(kernel):
        monkeypatch.setattr(LOGPROB_KERNELS, "get", lambda name: kernel if name == "triton" else real_get(name))

    return install


def _probe_fn(model, broken_attention=False, calls=None):
    """logprobs_fn for apply_kernels: the real token_logprobs, with packed attention off by 0.5 nats if asked."""

    def run(mb, choice):
        if calls is not None:
            calls.append((choice.logprob, choice.attention))
        logp = token_logprobs(model, mb, 1.0, kernels=choice)[0]
        return logp + 0.5 * mb.resp_mask if broken_attention and choice.packed else logp

    return run


@pytest.mark.parametrize(
    "broken_kernel,broken_attention,want",
    [
        (True, False, ("chunked", "sdpa_segments")),  # the kernel failed, the packed attention did not: keep it
        (False, True, ("triton", "padded")),
        (True, True, ("chunked", "padded")),
        (False, False, ("triton", "sdpa_segments")),
    ],
)
def test_failed_self_check_on_cuda_falls_back_to_chunked(fake_triton, broken_kernel, broken_attention, want):
    model = _tiny_qwen2()
    fake_triton(_fp32_math_kernel(shift=0.3 if broken_kernel else 0.0))
    chosen = KernelChoice("triton", "sdpa_segments", 16)
    calls = []
    got = apply_kernels(model, chosen, _CPU, logprobs_fn=_probe_fn(model, broken_attention, calls),
                        chunked_fallback=True)  # the CUDA default
    assert (got.logprob, got.attention) == want
    if want == ("triton", "sdpa_segments"):
        assert got == chosen  # no notes when everything passes
    else:
        assert got.chunk_size == 16 and f"so logprob={want[0]} attention={want[1]}" in got.describe()
        assert ("logprob=triton attention=padded differs" in got.describe()) == broken_kernel
    # the same probes whatever the outcome (a collective on sharded learners): each part alone, then combined
    assert calls == [("naive", "padded"), ("triton", "padded"), ("chunked", "padded"),
                     ("naive", "sdpa_segments"), ("triton", "sdpa_segments"), ("chunked", "sdpa_segments")]
    own = model.config._attn_implementation == "sdpa"
    assert own == (want[1] == "padded")  # the model's own attention is restored only when packing is dropped


def test_self_check_falls_back_to_naive_only_when_chunked_fails_too(fake_triton):
    """An undeclared transform of the logits in the head: neither fused kernel can reproduce it."""
    model = _tiny_qwen2()
    model.lm_head.register_forward_hook(lambda mod, inp, out: out * 2.0)
    fake_triton(_fp32_math_kernel())
    got = apply_kernels(model, KernelChoice("triton", "sdpa_segments"), _CPU, logprobs_fn=_probe_fn(model),
                        chunked_fallback=True)
    assert (got.logprob, got.attention) == ("naive", "sdpa_segments")  # the attention was fine
    assert "logprob=chunked attention=padded differs" in got.describe()


def test_failed_self_check_on_cpu_keeps_padded_naive(fake_triton):
    model = _tiny_qwen2()
    fake_triton(_fp32_math_kernel(shift=0.3))
    got = apply_kernels(model, KernelChoice("triton", "sdpa_segments"), _CPU, logprobs_fn=_probe_fn(model))
    assert (got.logprob, got.attention) == ("naive", "padded") and "so padded+naive" in got.describe()
    assert model.config._attn_implementation == "sdpa"


def test_self_check_tolerance_scales_with_bf16_logits(fake_triton):
    """bf16 logits up to ~60 (ulp 0.25-0.5): a kernel that keeps them in fp32 differs from the model's rounded
    head by more than 0.1 (the old fixed tolerance) and must pass; a 2% error in the logits must still fail."""
    model = _tiny_qwen2(torch.bfloat16, head_scale=3.0)
    logits_max = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: logits_max.append(float(out.abs().max())))
    calls = []
    fake_triton(_fp32_math_kernel())
    probe = _probe_fn(model, calls=calls)
    chosen = KernelChoice("triton", "padded")
    assert apply_kernels(model, chosen, _CPU, logprobs_fn=probe, chunked_fallback=True) == chosen
    hook.remove()
    assert max(logits_max) > 32
    # what the probe saw: the fp32-logit kernel against the bf16 head, beyond 0.1 but inside the tolerance
    gap = _probe_gap(model, probe, chosen)
    assert 0.1 < gap < 2 * 2**-7 * max(logits_max) + 0.1

    def scaled(hidden, weight, targets, temperature, ignore_index, chunk_size):
        return chunked_linear_logprobs(hidden.float(), weight.float() * 1.02, targets, temperature, ignore_index)

    fake_triton(scaled)
    got = apply_kernels(model, chosen, _CPU, logprobs_fn=probe, chunked_fallback=True)
    assert (got.logprob, got.attention) == ("chunked", "padded")


def _probe_gap(model, probe_fn, choice):
    """Largest |log-prob difference| between ``choice`` and padded + naive over the response positions of a
    few random sequences (as in apply_kernels' probe)."""
    g = torch.Generator().manual_seed(1234)
    samples = [TrainSample(torch.randint(0, 61, (n,), generator=g).tolist(),
                           torch.randint(0, 61, (m,), generator=g).tolist(), [0.0] * m, 0.0, "probe")
               for n, m in ((3, 5), (4, 2))]
    mb = make_micro_batches(samples, 1 << 20)[0]
    with torch.no_grad():
        want = probe_fn(mb, KernelChoice())
        got = probe_fn(mb, choice)
    return float(((got - want).abs() * mb.resp_mask).max())
