"""Policy losses: per-token surrogate losses over a packed micro-batch.

Every entry of ``POLICY_LOSSES`` has the signature ``fn(inp: PolicyLossInput, cfg: AlgorithmConfig)
-> PolicyLossOutput``. Losses are per token (to be minimized); ``rl.algorithms.aggregation`` turns
them into a scalar. Formulas: ``shared/reference/algorithms.md`` §0, §1.1, §2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rl.registry import Registry

if TYPE_CHECKING:
    from rl.algorithms.config import AlgorithmConfig


@dataclass
class PolicyLossInput:
    """One packed micro-batch of response tokens (T tokens of ``num_seqs`` sequences).

    logp:       [T] float, log-probs of the sampled tokens under the current policy (requires grad).
    old_logp:   [T] float, log-probs under the policy that the ratio is taken against (behaviour or
                recomputed old policy). Treated as a constant.
    advantages: [T] float, per-token advantages (the sample's advantage broadcast). A constant.
    mask:       [T] bool or float, 1 on tokens that are trained on (sampled response tokens only).
    seq_index:  [T] long, the sequence each token belongs to, in 0..num_seqs-1.
    num_seqs:   number of sequences in this micro-batch.
    """

    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    seq_index: Tensor
    num_seqs: int

    def __post_init__(self) -> None:
        shape = self.logp.shape
        if self.logp.dim() != 1:
            raise ValueError(f"logp must be 1-D [T] (packed), got {tuple(shape)}")
        for name in ("old_logp", "advantages", "mask", "seq_index"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {tuple(shape)}")
        if self.seq_index.dtype != torch.long:
            raise ValueError(f"seq_index must be torch.long, got {self.seq_index.dtype}")


@dataclass
class PolicyLossOutput:
    """per_token_loss: [T], zero where the mask is 0. metrics: detached scalar tensors over masked tokens
    of this micro-batch (un-namespaced; the learner prefixes ``loss/``)."""

    per_token_loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


PolicyLossFn = Callable[[PolicyLossInput, "AlgorithmConfig"], PolicyLossOutput]

POLICY_LOSSES: Registry[PolicyLossFn] = Registry(
    "policy loss",
    capabilities={
        "needs_ref_logprobs": False,  # reads reference-policy log-probs
        "sequence_level_ratio": False,  # the ratio is shared by all tokens of a sequence
    },
)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over tokens where ``mask`` is set; 0 when the mask is empty."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def _clipped_surrogate(ratio: Tensor, adv: Tensor, cfg: AlgorithmConfig) -> tuple[Tensor, Tensor]:
    """PPO clip with decoupled bounds: (max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), clipped-branch flag)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(inp: PolicyLossInput, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """PPO clipped surrogate on token ratios r = exp(clamp(logp - old_logp)), with optional dual clip.

    loss = max(-A r, -A clip(r, 1-eps_low, 1+eps_high)); for A < 0 and ``cfg.dual_clip_c`` set, the loss
    is further capped at -A c (Ye et al. 2020, arXiv 1912.09729). Tokens on a clipped branch get no gradient.
    """
    mask = inp.mask.to(torch.bool)
    adv = inp.advantages.detach()
    log_ratio = (inp.logp - inp.old_logp.detach()).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    loss, clip_active = _clipped_surrogate(ratio, adv, cfg)

    dual_active = torch.zeros_like(mask)
    if cfg.dual_clip_c is not None:
        cap = -adv * cfg.dual_clip_c
        dual_active = (adv < 0) & (cap < loss)
        loss = torch.where(dual_active, cap, loss)
        clip_active = clip_active & ~dual_active

    loss = torch.where(mask, loss, torch.zeros_like(loss))
    metrics = {
        "clip_frac": masked_mean(clip_active.to(loss.dtype), mask),
        "dual_clip_frac": masked_mean(dual_active.to(loss.dtype), mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "approx_kl": masked_mean(-log_ratio.detach(), mask),
    }
    return PolicyLossOutput(loss, {k: v.detach() for k, v in metrics.items()})


@POLICY_LOSSES.register("gspo", sequence_level_ratio=True)
def gspo(inp: PolicyLossInput, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """GSPO-token (Zheng et al. 2025, arXiv 2507.18071): clipped surrogate on a sequence-level ratio.

    s_i = exp(mean over masked tokens of sequence i of (logp - old_logp)), the geometric-mean ratio,
    and per token s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]: its value is s_i and its gradient w.r.t.
    logp_t is s_i, so with ``seq-mean-token-mean`` aggregation and A constant within a sequence this has
    exactly GSPO's value and gradient, while still allowing per-token advantages. The log of s_{i,t} is
    clamped to +-``cfg.log_ratio_clamp``. ``cfg.dual_clip_c`` is not applied.
    """
    mask = inp.mask.to(torch.bool)
    m = mask.to(inp.logp.dtype)
    adv = inp.advantages.detach()
    token_log_ratio = (inp.logp - inp.old_logp.detach()).detach()
    zeros = token_log_ratio.new_zeros(inp.num_seqs)
    seq_len = zeros.index_add(0, inp.seq_index, m).clamp(min=1)
    seq_log_ratio = zeros.index_add(0, inp.seq_index, token_log_ratio * m) / seq_len  # [B], log s_i
    log_ratio = seq_log_ratio[inp.seq_index] + inp.logp - inp.logp.detach()
    log_ratio = log_ratio.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    loss, clip_active = _clipped_surrogate(ratio, adv, cfg)

    loss = torch.where(mask, loss, torch.zeros_like(loss))
    metrics = {
        "clip_frac": masked_mean(clip_active.to(loss.dtype), mask),
        "dual_clip_frac": torch.zeros((), dtype=loss.dtype, device=loss.device),
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "approx_kl": masked_mean(-token_log_ratio, mask),
    }
    return PolicyLossOutput(loss, {k: v.detach() for k, v in metrics.items()})


def compute_policy_loss(inp: PolicyLossInput, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """Per-token loss from the policy loss named by ``cfg.policy_loss``."""
    return POLICY_LOSSES.get(cfg.policy_loss)(inp, cfg)
