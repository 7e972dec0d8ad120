"""Triton kernels of the ``triton`` log-prob kernel (math and gradient formulas: ``trainers.fused_logprob``).

Imported only when that kernel runs (CUDA). ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors with
numpy, which is how the unit tests check them on machines without a GPU.

Forward, grid (row blocks, vocabulary splits): each program scans its split of V in ``BLOCK_V`` tiles. A tile's
logits are ``tl.dot`` products over ``BLOCK_H`` slices of H (fp32 accumulation, divided by the temperature) and
feed per-row online statistics: running max m, s = sum exp(z - m), a = sum exp(z - m) (z - m), and the target's
logit. Splits give small partial statistics [T, splits], merged in torch: lse = M + log S, ent = log S - A / S
(the centred form keeps the entropy accurate when one token dominates).

Backward, one program per (row block, vocabulary tile): each recomputes its [BLOCK_T, BLOCK_V] logits tile from
h and W, forms dz in registers, and for every H slice adds dz @ W_tile into dh [T, H] and dz^T @ h_block into
dW [V, H] (fp32 buffers, atomic adds). Nothing of size [T, V] is stored. The order of atomic adds depends on
scheduling, so gradients are not bit-reproducible run to run (differences at fp32 rounding level).
Programs are numbered in groups of ``GROUP_T`` row blocks: consecutive programs (those resident on the GPU at the
same time) cycle through the group's row blocks and then step to the next vocabulary tile. Row-major or
column-major order would make every resident program add into the same dW tile (row blocks fastest) or the same
dh rows (vocabulary tiles fastest); grouped, each dh tile has about resident/GROUP_T concurrent writers and
each dW tile about GROUP_T, and the group's h rows and W tiles stay in L2.

Tiles (``_blocks``): the forward and the backward have separate defaults. The backward holds the logits tile,
dz and two dot accumulators at once, so it needs smaller tiles than the forward to stay inside 255 registers
per thread without spilling to local memory on sm_90; ``tests/unit/test_triton_sm90.py`` compiles the defaults
for sm_90 and checks the register count and the stack (spill) size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, temperature,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_T, BLOCK_V] fp32 tile of (h @ W^T) / temperature (zero rows/columns outside the matrix)."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        hb = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(hb, tl.trans(wb), acc=acc, input_precision=PRECISION)
    return acc / temperature


@triton.jit
def _forward_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, a_ptr, zt_ptr,
                    T, V, H, stride_h, stride_w, v_per_split, num_splits, temperature,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    a = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_T,), dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, temperature,
                         BLOCK_T, BLOCK_V, BLOCK_H, PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 on masked columns
        centred = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        # Re-centre a on the new max: sum e^(z-m)(z-m) -> alpha * (a + (m - m_new) * s); s == 0 before any tile.
        shift = (tl.where(s > 0, m, m_new) - m_new) * s
        a = alpha * (a + shift) + tl.sum(e * centred, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zt += tl.sum(tl.where((cols[None, :] == tgt[:, None]) & col_ok[None, :], z, 0.0), axis=1)
        m = m_new
    out = rows * num_splits + pid_s
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(a_ptr + out, a, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)


@triton.jit
def _backward_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, g1_ptr, g2_ptr, dh_ptr, dw_ptr,
                     T, V, H, stride_h, stride_w, temperature,
                     HAS_G2: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                     GROUP_T: tl.constexpr):
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BLOCK_T)
    n_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_T * n_v
    first_t = (pid // per_group) * GROUP_T
    group_rows = tl.minimum(n_t - first_t, GROUP_T)  # the last group may hold fewer row blocks
    in_group = pid % per_group
    pid_t = first_t + in_group % group_rows
    pid_v = in_group // group_rows
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    col_ok = cols < V
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, temperature,
                     BLOCK_T, BLOCK_V, BLOCK_H, PRECISION)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g1 = tl.load(g1_ptr + rows, mask=row_ok, other=0.0)  # zero on ignored rows (set by the caller)
    logp = z - lse[:, None]
    p = tl.where(col_ok[None, :], tl.exp(logp), 0.0)
    coef = g1[:, None] + tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    if HAS_G2:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g2 = tl.load(g2_ptr + rows, mask=row_ok, other=0.0)
        coef += g2[:, None] * (logp + ent[:, None])
    dz = tl.where((cols[None, :] == tgt[:, None]) & col_ok[None, :], g1[:, None], 0.0) - p * coef
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz / temperature, 0.0)
    dz = dz.to(h_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        if NEED_DH:
            wb = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                         other=0.0)
            dh_part = tl.dot(dz, wb, input_precision=PRECISION)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], dh_part, mask=row_ok[:, None] & k_ok[None, :])
        if NEED_DW:
            hb = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            dw_part = tl.dot(tl.trans(dz), hb, input_precision=PRECISION)
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], dw_part, mask=col_ok[:, None] & k_ok[None, :])


# Default tiles (BLOCK_T, BLOCK_V, BLOCK_H, num_warps). Compiled for sm_90 (Triton 3.9, its bundled ptxas), with
# both gradients and the entropy term, registers / stack (spill) bytes per thread:
#   16-bit forward  64/128/64, 8 warps: 254 / 0       16-bit backward 64/128/32, 8 warps: 219 / 0
#   fp32   forward  32/64/32,  4 warps: 178 / 0       fp32   backward 32/64/32,  8 warps: 139 / 0
# The backward spills at the forward's tiles (16-bit 64/128/64: 255 / 200; fp32 at 4 warps: 255 / 24). Of the
# spill-free 16-bit backward tiles, 64/128/32 does a quarter fewer atomic adds than 64/64/64 (210 / 0): dh gets
# one add per vocabulary tile, so the wider BLOCK_V halves those.
FORWARD_TILES = {torch.float32: (32, 64, 32, 4), None: (64, 128, 64, 8)}
BACKWARD_TILES = {torch.float32: (32, 64, 32, 8), None: (64, 128, 32, 8)}
BACKWARD_GROUP_T = 8  # row blocks per group of backward programs (see the module docstring)


def _blocks(dtype: torch.dtype, block_t: int | None, block_v: int | None, block_h: int | None) -> tuple:
    """(forward tiles, backward tiles), each (BLOCK_T, BLOCK_V, BLOCK_H, num_warps): fp32 or 16-bit defaults,
    with explicit block sizes applied to both. Not autotuned: tune on the target GPU with
    benchmarks/fused_logprob.py, and recheck spills with tests/unit/test_triton_sm90.py."""
    key = torch.float32 if dtype == torch.float32 else None

    def pick(base: tuple) -> tuple:
        return (block_t or base[0], block_v or base[1], block_h or base[2], base[3])

    return pick(FORWARD_TILES[key]), pick(BACKWARD_TILES[key])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 inputs read it; ieee keeps fp32 exact


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


class TritonLinearLogprob(torch.autograd.Function):
    """Same contract as ``fused_logprob.ChunkedLinearLogprob`` (outputs fp32), without chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, blocks):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        n, h_dim = hidden.shape
        v = weight.shape[0]
        valid = targets != ignore_index
        tgt = torch.where(valid, targets, torch.full_like(targets, -1)).contiguous()
        bt, bv, bh, warps = blocks[0]
        row_blocks = triton.cdiv(n, bt)
        # Enough programs to fill the GPU when there are few row blocks: split V, merge the splits in torch.
        splits = max(1, min(triton.cdiv(4 * _num_sms(hidden.device), max(row_blocks, 1)), triton.cdiv(v, bv)))
        v_per_split = triton.cdiv(triton.cdiv(v, splits), bv) * bv
        splits = triton.cdiv(v, v_per_split)
        stats = torch.empty(4, n, splits, dtype=torch.float32, device=hidden.device)
        if n > 0:
            _forward_kernel[(row_blocks, splits)](
                hidden, weight, tgt, stats[0], stats[1], stats[2], stats[3],
                n, v, h_dim, hidden.stride(0), weight.stride(0), v_per_split, splits, temperature,
                BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, PRECISION=_precision(hidden.dtype), num_warps=warps,
            )
        m, s, a, zt = stats
        big_m = m.max(dim=1).values
        w = torch.exp(m - big_m[:, None])
        total_s = (s * w).sum(1)
        total_a = (w * (a + (torch.where(s > 0, m, big_m[:, None]) - big_m[:, None]) * s)).sum(1)
        lse = big_m + torch.log(total_s)
        ent = torch.log(total_s) - total_a / total_s
        logp = torch.where(valid, zt.sum(1) - lse, torch.zeros_like(lse))
        ent_out = torch.where(valid, ent, torch.zeros_like(ent))
        ctx.save_for_backward(hidden, weight, tgt, valid, lse, ent)
        ctx.temperature, ctx.blocks = temperature, blocks
        return logp, ent_out

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, tgt, valid, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, h_dim = hidden.shape
        v = weight.shape[0]
        g1 = torch.zeros_like(lse) if g_logp is None else g_logp.float().masked_fill(~valid, 0.0).contiguous()
        g2 = None if g_ent is None else g_ent.float().masked_fill(~valid, 0.0).contiguous()
        dh = torch.zeros(n, h_dim, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.zeros(v, h_dim, dtype=torch.float32, device=weight.device) if need_w else None
        bt, bv, bh, warps = ctx.blocks[1]
        if n > 0 and (need_h or need_w):
            _backward_kernel[(triton.cdiv(n, bt) * triton.cdiv(v, bv),)](
                hidden, weight, tgt, lse, ent, g1, g2 if g2 is not None else g1,
                dh if need_h else lse, dw if need_w else lse,
                n, v, h_dim, hidden.stride(0), weight.stride(0), ctx.temperature,
                HAS_G2=g2 is not None, NEED_DH=need_h, NEED_DW=need_w,
                BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, PRECISION=_precision(hidden.dtype), GROUP_T=BACKWARD_GROUP_T,
                num_warps=warps,
            )
        return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None,
                None, None, None, None)


def triton_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                           ignore_index: int, *, block_t: int | None = None, block_v: int | None = None,
                           block_h: int | None = None) -> tuple[Tensor, Tensor]:
    """(logp [T], ent [T]) fp32, differentiable in hidden and weight. Inputs are checked by the caller
    (``fused_logprob.triton_linear_logprobs``)."""
    blocks = _blocks(hidden.dtype, block_t, block_v, block_h)
    return TritonLinearLogprob.apply(hidden, weight, targets, float(temperature), ignore_index, blocks)
