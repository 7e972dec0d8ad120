"""The drafter: an EAGLE-style head that drafts the target model's next tokens from its last hidden states.

EAGLE (Li et al., 2024, arxiv.org/abs/2401.15077) drafts in feature space. At position ``t`` the drafter reads
``fc([embed(x[t+1]); h[t]])`` (``h[t]``: the target's last hidden state at ``t``, the one whose logits chose
``x[t+1]``), runs one decoder layer and predicts ``h[t+1]``; the target's LM head turns that into a distribution
over ``x[t+2]``. Drafting further feeds the drafter's own prediction back as the hidden state.

The layout follows vLLM's ``EagleLlamaForCausalLM`` (``vllm/model_executor/models/llama_eagle.py``) exactly, so
that a trained drafter behaves the same in the engine:

- the hidden state vLLM hands the drafter is the target model's output **after** its final norm (the state the
  LM head reads), so the drafter regresses that state, and its own output goes to the LM head with **no** norm;
- layer 0 has no input norm (the ``fc`` output enters attention directly); later layers are ordinary pre-norm
  Llama layers; there is no final norm; the residual stream is summed at the end;
- the drafter at position ``t`` uses rotary position ``t`` (the target's position of ``h[t]``, not of ``x[t+1]``);
- ``fc`` and the Llama projections have no bias (Llama's defaults; the target may be a Qwen2 with q/k/v biases).

Embedding and LM head are the target's: copied in and frozen here, shared (not saved) in the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DrafterConfig:
    """Shape of the drafter; ``from_target`` derives it from the target's transformers config."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    num_layers: int = 1
    """Decoder layers; EAGLE and TLT use one."""

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

    @classmethod
    def from_target(cls, target_config: Any, *, num_layers: int = 1) -> DrafterConfig:
        """From a transformers config of a Llama-family target (Qwen2, Llama: RMSNorm, SiLU MLP, plain RoPE)."""
        rope = getattr(target_config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"target uses rope_type {rope_type!r}; the drafter implements the default RoPE only")
        theta = rope.get("rope_theta", getattr(target_config, "rope_theta", None))
        if theta is None:
            raise ValueError("target config has no rope_theta (neither in rope_parameters nor at the top level)")
        act = getattr(target_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"target uses hidden_act {act!r}; the drafter's Llama MLP uses 'silu'")
        heads = int(target_config.num_attention_heads)
        head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // heads
        return cls(
            hidden_size=int(target_config.hidden_size),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(target_config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate_size=int(target_config.intermediate_size),
            vocab_size=int(target_config.vocab_size),
            rope_theta=float(theta),
            rms_norm_eps=float(target_config.rms_norm_eps),
            max_position_embeddings=int(target_config.max_position_embeddings),
            num_layers=num_layers,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin ``[B, T, head_dim]`` for integer ``positions [B, T]`` (NeoX layout: the two halves rotate together)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, heads, T, D]``, ``cos``/``sin`` ``[B, T, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # Causal attention; right padding never leaks into real positions, so no padding mask is needed.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A pre-norm Llama layer; layer 0 has no ``input_layernorm`` (its input is the ``fc`` projection)."""

    def __init__(self, cfg: DrafterConfig, index: int) -> None:
        super().__init__()
        if index > 0:
            self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(x) if hasattr(self, "input_layernorm") else x
        x = x + self.self_attn(normed, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Drafter(nn.Module):
    """``forward(input_ids, target_hidden) -> predicted next hidden``; ``logits(hidden)`` via the target's LM head.

    Trainable: ``fc`` and ``layers``; their ``state_dict`` names are the checkpoint names vLLM loads
    (``fc.weight``, ``layers.0.self_attn.q_proj.weight``, ...). ``embed_tokens`` and ``lm_head`` hold copies of
    the target's weights with ``requires_grad=False``; ``trainable_parameters`` never yields them.
    """

    SHARED_PREFIXES = ("embed_tokens.", "lm_head.")

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)
        self.embed_tokens.requires_grad_(False)
        self.lm_head.requires_grad_(False)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_layers)])

    @classmethod
    def from_target(cls, target_model: nn.Module, *, num_layers: int = 1, seed: int | None = 0) -> Drafter:
        """A freshly initialized drafter for a transformers causal LM (its config, embedding and LM head)."""
        cfg = DrafterConfig.from_target(target_model.config, num_layers=num_layers)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            drafter = cls(cfg)
        drafter.copy_shared_from(target_model)
        return drafter

    @torch.no_grad()
    def copy_shared_from(self, target_model: nn.Module) -> None:
        """Copy the target's current input embedding and LM head (call again after the target is updated)."""
        embed = target_model.get_input_embeddings().weight
        head = target_model.get_output_embeddings().weight
        self.set_shared_weights(embed, head)

    @torch.no_grad()
    def set_shared_weights(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """``embed_weight``, ``lm_head_weight``: ``[vocab, hidden]`` each."""
        expected = (self.cfg.vocab_size, self.cfg.hidden_size)
        for name, w in (("embedding", embed_weight), ("lm_head", lm_head_weight)):
            if tuple(w.shape) != expected:
                raise ValueError(f"target {name} has shape {tuple(w.shape)}, the drafter expects {expected}")
        self.embed_tokens.weight.copy_(embed_weight)
        self.lm_head.weight.copy_(lm_head_weight)

    def set_shared_dtype(self, dtype: torch.dtype) -> None:
        """Keep the frozen embedding and LM head copies in ``dtype`` (the target's, e.g. bfloat16: half the memory
        of float32 at a large vocabulary); the drafter's own weights stay as they are."""
        self.embed_tokens.to(dtype)
        self.lm_head.to(dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith(self.SHARED_PREFIXES)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The drafter's own weights, under the names vLLM's EAGLE checkpoint uses (no embedding, no LM head)."""
        return {name: t for name, t in self.state_dict().items() if not name.startswith(self.SHARED_PREFIXES)}

    def forward(
        self,
        input_ids: torch.Tensor,
        target_hidden: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted next hidden states ``[B, T, H]``.

        input_ids:     [B, T] the token *after* each hidden state's position (``x[t+1]`` next to ``h[t]``).
        target_hidden: [B, T, H] the target's last hidden states (after its final norm) ``h[t]``.
        positions:     [B, T] rotary positions ``t``; default ``0..T-1``.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([self.embed_tokens(input_ids).to(dtype), target_hidden.to(dtype)], dim=-1))
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., vocab]`` from predicted hidden states (the target's LM head, no norm: vLLM applies none), in the
        LM head's dtype."""
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))


def num_trainable_parameters(drafter: Drafter) -> int:
    return sum(p.numel() for p in drafter.trainable_parameters())

