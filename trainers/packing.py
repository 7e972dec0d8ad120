"""Padding-free packing: variable-length sequences back to back in one row, attention kept inside each sequence.

A packed micro-batch is one row ``input_ids [1, T]`` holding B sequences, ``position_ids [1, T]`` restarting
at 0 for each sequence (so RoPE sees per-sequence positions) and ``cu_seqlens [B+1]`` (int32 offsets
``[0, l1, l1+l2, ...]``). The model runs with an attention implementation registered here with transformers
(``rl_packed_<backend>``) that receives ``cu_seq_lens_q`` / ``max_length_q`` through the model's forward kwargs
(transformers passes them down to the attention call) and attends causally within each sequence only.
Backends (``ATTENTION_BACKENDS``; :func:`select_attention_backend` picks the first that works):

- ``fa2_varlen``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, when flash-attn is installed);
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16);
- ``sdpa_segments``: ``scaled_dot_product_attention`` with ``is_causal`` on each sequence's slice (any device
  and dtype; the CPU path and the reference).

No attention mask is built for packed rows. A call without ``cu_seq_lens_q`` (a plain ``model(ids)``) falls back
to causal SDPA per row, which is right for unpadded or right-padded rows.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rl.registry import Registry

ATTENTION_BACKENDS: Registry = Registry(
    "packed attention backend", capabilities={"needs_cuda": False, "half_only": False, "requires_module": None}
)


def pack_groups(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped so each group's total length is at most ``token_budget`` (a longer
    single sequence gets a group of its own). Deterministic; groups are returned in creation order, and each
    group's indices in the order they were placed (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for g, free in enumerate(room):
            if lengths[i] <= free:
                groups[g].append(i)
                room[g] -= lengths[i]
                break
        else:
            groups.append([i])
            room.append(token_budget - lengths[i])
    return groups


def packed_positions(lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(position_ids [1, sum(lengths)] restarting at 0 per sequence, cu_seqlens [B+1] int32)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(list(lengths), dtype=torch.int64), 0).to(torch.int32)
    pos = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
    return pos.unsqueeze(0), cu


def packed_forward_kwargs(position_ids: Tensor, cu_seqlens: Tensor, max_length: int) -> dict:
    """Keyword arguments for ``model(input_ids=..., **kwargs)`` on a packed row (with a ``rl_packed_*``
    attention implementation set on the model)."""
    return dict(position_ids=position_ids, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                max_length_q=max_length, max_length_k=max_length, use_cache=False)


# ---------------------------------------------------------------- backends: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]
@ATTENTION_BACKENDS.register("fa2_varlen", needs_cuda=True, half_only=True, requires_module="flash_attn")
def _fa2_varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float, dropout: float) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale, causal=True)


@ATTENTION_BACKENDS.register("torch_varlen", needs_cuda=True, half_only=True,
                             requires_module="torch.nn.attention.varlen")
def _torch_varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float, dropout: float) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if dropout:
        raise ValueError("the torch_varlen attention backend has no dropout; use fa2_varlen or sdpa_segments")
    # window (-1, 0): causal.
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0),
                       enable_gqa=q.shape[1] != k.shape[1])


@ATTENTION_BACKENDS.register("sdpa_segments")
def _sdpa_segments(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float, dropout: float) -> Tensor:
    bounds = cu.tolist()
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in itertools.pairwise(bounds):
        # [l, H, D] -> [H, l, D] for SDPA, back after.
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                           dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0)


def backend_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run for this device and dtype (None when it can)."""
    caps = ATTENTION_BACKENDS.capabilities(ATTENTION_BACKENDS.check(name))
    if caps["needs_cuda"] and device.type != "cuda":
        return f"{name} needs CUDA (device is {device.type})"
    if caps["half_only"] and dtype not in (torch.float16, torch.bfloat16):
        return f"{name} needs fp16/bf16 weights (model is {dtype})"
    if caps["requires_module"] and importlib.util.find_spec(caps["requires_module"]) is None:
        return f"{name} needs {caps['requires_module']}, which is not installed"
    return None


def select_attention_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, list[str]]:
    """The first usable backend in order of preference, and why each earlier one was skipped."""
    skipped = []
    for name in ("fa2_varlen", "torch_varlen", "sdpa_segments"):
        why = backend_unavailable(name, device, dtype)
        if why is None:
            return name, skipped
        skipped.append(why)
    raise AssertionError(f"sdpa_segments always runs; skipped: {skipped}")


# ---------------------------------------------------------------- transformers attention implementations
def attn_implementation_name(backend: str) -> str:
    return f"rl_packed_{ATTENTION_BACKENDS.check(backend)}"


def _make_attention(backend: str):
    run = ATTENTION_BACKENDS.get(backend)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                  cu_seq_lens_q=None, max_length_q=None, **kwargs):
        """transformers attention interface: query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
        if sliding_window is not None:
            raise ValueError("packed attention does not implement sliding-window layers; "
                             "set learner.kernels.attention=padded for this model")
        if cu_seq_lens_q is None:  # not a packed call: plain causal attention per row
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=query.shape[2] > 1,
                                                 scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
            return out.transpose(1, 2).contiguous(), None
        if query.shape[0] != 1:
            raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, H, D]
        out = run(q, k, v, cu_seq_lens_q.to(device=q.device, dtype=torch.int32), int(max_length_q),
                  scaling, dropout)
        return out.unsqueeze(0), None

    return attention


def register_packed_attention() -> None:
    """Register every backend's ``rl_packed_<backend>`` implementation with transformers (idempotent)."""
    from transformers import AttentionInterface

    for name in ATTENTION_BACKENDS.names():
        AttentionInterface.register(attn_implementation_name(name), _make_attention(name))


def use_packed_attention(model, backend: str) -> None:
    """Switch ``model`` (a transformers PreTrainedModel) to packed attention with ``backend``."""
    register_packed_attention()
    model.set_attn_implementation(attn_implementation_name(backend))


def packing_unsupported(model) -> str | None:
    """Why ``model`` cannot run packed (None when it can): sliding-window or non-attention layers, which would
    ignore the sequence boundaries."""
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        return f"layer types {other} (packing here supports full attention layers only)"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    return None
