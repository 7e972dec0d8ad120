"""Token log-probs and entropies of a linear LM head without the [T, V] logits tensor.

For hidden states h [T, H], LM-head weight W [V, H], targets y [T] and a temperature tau::

    z[t] = (h[t] @ W^T) / tau                      (fp32)
    logp[t] = z[t, y_t] - logsumexp(z[t])
    ent[t]  = -sum_v p[t, v] log p[t, v],          p[t] = softmax(z[t])

Gradients with upstream g (of logp) and e (of ent), per row::

    d logp / d z_v = 1[v = y] - p_v
    d ent  / d z_v = -p_v (log p_v + ent)
    dz = g 1[v = y] - p * (g + e (log p + ent));   d(h @ W^T) = dz / tau
    dh = d(h @ W^T) @ W,    dW = d(h @ W^T)^T @ h

Rows whose target is ``ignore_index`` give logp = ent = 0 and no gradient. Kernels (``LOGPROB_KERNELS``, one
signature ``fn(hidden, weight, targets, temperature, ignore_index, chunk_size) -> (logp [T], ent [T])``):

- ``naive``: materializes the [T, V] logits; the reference (run it in float64 for tests). Its capability
  ``full_logits`` tells the learner to use the model's own forward instead (any head: soft-capping, bias, ...).
- ``chunked``: :class:`ChunkedLinearLogprob`, a torch autograd Function over row chunks. Saves h, W, targets and
  the per-row logsumexp/entropy; backward recomputes the chunk's logits. Peak extra memory: a few [chunk, V]
  fp32 buffers. Runs anywhere (CPU and CUDA).
- ``triton``: ``trainers.triton_logprob`` (CUDA only; triton is imported only when this kernel is called).

Both outputs are differentiable (an entropy bonus would backpropagate through ``ent``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl.registry import Registry

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 25  # rows per chunk * V: ~128 MiB per fp32 [chunk, V] buffer

LOGPROB_KERNELS: Registry = Registry(
    "log-prob kernel", capabilities={"full_logits": False, "needs_cuda": False, "requires_module": None}
)


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 [chunk, V] buffer is about 128 MiB (at least 16 rows, at most 8192)."""
    return max(16, min(8192, _CHUNK_ELEMENTS // max(vocab_size, 1) // 16 * 16))


def _check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, ignore_index: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(f"expected hidden [T, H], weight [V, H], targets [T]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"targets outside [0, {weight.shape[0]}) that are not ignore_index={ignore_index}: "
                         f"{targets[bad][:5].tolist()}")


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; float64 stays float64 (gradcheck, references)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """[c, V] logits / temperature in fp32 (float64 for float64 inputs). The GEMM runs in the input dtype
    (fp32 accumulation on the BLAS side), like the model's own ``lm_head`` followed by ``.float()``."""
    z = h @ weight.t()
    return z.to(_math_dtype(z.dtype)).div_(temperature)


class ChunkedLinearLogprob(torch.autograd.Function):
    """(hidden [T, H], weight [V, H], targets [T], temperature, ignore_index, chunk_size) -> (logp [T], ent [T]),
    both fp32 (float64 for float64 inputs), computed ``chunk_size`` rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, chunk_size):
        n = hidden.shape[0]
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        logp = torch.zeros(n, dtype=_math_dtype(hidden.dtype), device=hidden.device)
        ent = torch.zeros_like(logp)
        lse = torch.zeros_like(logp)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(hidden[s:e], weight, temperature)
            lse_c = torch.logsumexp(z, dim=-1)
            target_z = z.gather(1, safe[s:e, None]).squeeze(1)
            logp_all = z.sub_(lse_c[:, None])  # in place: z is not needed any more
            ent[s:e] = -(logp_all.exp() * logp_all).sum(-1)
            logp[s:e] = target_z - lse_c
            lse[s:e] = lse_c
        logp = logp.masked_fill(~valid, 0.0)
        ent = ent.masked_fill(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, safe, valid, lse, ent)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, safe, valid, lse, ent = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        zeros = torch.zeros_like(lse)
        g1 = zeros if g_logp is None else g_logp.to(lse.dtype).masked_fill(~valid, 0.0)
        g2 = None if g_ent is None else g_ent.to(lse.dtype).masked_fill(~valid, 0.0)
        dh = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator for dW across chunks (a bf16 running sum would lose the small contributions).
        dw = torch.zeros(weight.shape, dtype=_math_dtype(weight.dtype), device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            h = hidden[s:e]
            logp_all = _chunk_logits(h, weight, tau).sub_(lse[s:e, None])
            p = logp_all.exp()
            if g2 is None:
                dz = p.mul_(-g1[s:e, None])
            else:  # coef = g + e (log p + ent), computed in the log-p buffer
                coef = logp_all.add_(ent[s:e, None]).mul_(g2[s:e, None]).add_(g1[s:e, None])
                dz = p.mul_(coef).neg_()
            dz.scatter_add_(1, safe[s:e, None], g1[s:e, None])
            dz = dz.div_(tau).to(hidden.dtype)
            if need_h:
                dh[s:e] = dz @ weight
            if need_w:
                if dw.dtype == hidden.dtype:
                    dw.addmm_(dz.t(), h)
                else:
                    dw.add_(dz.t() @ h)
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None, None


@LOGPROB_KERNELS.register("naive", full_logits=True)
def naive_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                          ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The reference: full [T, V] logits in the input dtype's precision (fp32 at least; float64 stays float64)."""
    _check_inputs(hidden, weight, targets, temperature, ignore_index)
    z = hidden @ weight.t()
    z = z.to(_math_dtype(z.dtype)) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(1, safe[:, None]).squeeze(1) * valid
    ent = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, ent


@LOGPROB_KERNELS.register("chunked")
def chunked_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                            ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies [T], fp32 (float64 for float64 inputs), ``chunk_size`` rows at a time
    (None: :func:`auto_chunk_size`)."""
    _check_inputs(hidden, weight, targets, temperature, ignore_index)
    chunk = chunk_size or auto_chunk_size(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ChunkedLinearLogprob.apply(hidden, weight, targets, float(temperature), ignore_index, int(chunk))


@LOGPROB_KERNELS.register("triton", needs_cuda=True, requires_module="triton")
def triton_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                           ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The Triton kernels (``trainers.triton_logprob``); ``chunk_size`` is unused (tiles are fixed)."""
    _check_inputs(hidden, weight, targets, temperature, ignore_index)
    from trainers.triton_logprob import triton_linear_logprobs as run

    return run(hidden, weight, targets, float(temperature), ignore_index)


def logprob_kernel_unavailable(name: str, device: torch.device) -> str | None:
    """Why kernel ``name`` cannot run on ``device`` (None when it can). Does not import triton on CPU."""
    LOGPROB_KERNELS.check(name)
    if LOGPROB_KERNELS.capabilities(name)["needs_cuda"] and device.type != "cuda":
        return f"{name} needs CUDA (device is {device.type})"
    module = LOGPROB_KERNELS.capabilities(name)["requires_module"]
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return f"{name} needs the {module} package, which is not installed"
    return None
