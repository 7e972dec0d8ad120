"""Policy losses: per-token surrogate losses over a packed micro-batch.

Every entry of ``POLICY_LOSSES`` has the signature ``fn(inp: PolicyLossInput, cfg: AlgorithmConfig)
-> PolicyLossOutput``. Losses are per token (to be minimized); ``rl.algorithms.aggregation`` turns
them into a scalar. Formulas: ``docs/algorithms.md`` "Token ratio and clipped losses", "SAPO",
"CISPO".

Every entry reports the same metric keys (``POLICY_LOSS_METRICS``), each a mean over masked-in tokens;
a key that does not apply to a loss has a documented neutral value, so dashboards can compare runs.
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


POLICY_LOSS_METRICS = (
    "clip_frac",  # clip_frac_low + clip_frac_high
    "clip_frac_low",  # A < 0 and the ratio below 1 - clip_eps_low: the clipped branch wins. 0 for `sapo`
    "clip_frac_high",  # A > 0 and the ratio above 1 + clip_eps_high: the clipped branch wins. 0 for `sapo`
    "dual_clip_frac",  # A < 0 and the loss capped at -A * dual_clip_c. 0 for `gspo` and `sapo`
    "gate_mean",  # weight of the token's gradient relative to the unclipped surrogate -A r: SAPO's
    # w = 4 p (1 - p); 1 on a token whose clip loss takes the unclipped branch, 0 on a clipped one
    "ratio_mean",  # importance ratio the loss uses (token ratio; GSPO: the sequence ratio)
    "approx_kl",  # mean of old_logp - logp (k1 estimate of KL(old || current))
)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over tokens where ``mask`` is set; 0 when the mask is empty."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def _metrics(
    mask: Tensor, ratio: Tensor, neg_log_ratio: Tensor, clip_low: Tensor, clip_high: Tensor, dual: Tensor, gate: Tensor
) -> dict[str, Tensor]:
    """The ``POLICY_LOSS_METRICS`` of one micro-batch from per-token [T] values (flags may be bool)."""

    def mean(x: Tensor) -> Tensor:
        return masked_mean(x.detach().to(ratio.dtype), mask)

    low, high = mean(clip_low), mean(clip_high)
    metrics = {
        "clip_frac": low + high,
        "clip_frac_low": low,
        "clip_frac_high": high,
        "dual_clip_frac": mean(dual),
        "gate_mean": mean(gate),
        "ratio_mean": mean(ratio),
        "approx_kl": mean(neg_log_ratio),
    }
    assert tuple(metrics) == POLICY_LOSS_METRICS
    return metrics


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
    metrics = _metrics(
        mask, ratio, -log_ratio, clip_active & (adv < 0), clip_active & (adv > 0), dual_active,
        ~(clip_active | dual_active),
    )
    return PolicyLossOutput(loss, metrics)


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
    no_dual = torch.zeros_like(mask)
    metrics = _metrics(
        mask, ratio, -token_log_ratio, clip_active & (adv < 0), clip_active & (adv > 0), no_dual, ~clip_active
    )
    return PolicyLossOutput(loss, metrics)


@POLICY_LOSSES.register("sapo")
def sapo(inp: PolicyLossInput, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """SAPO (Qwen, arXiv 2511.20347): a soft sigmoid gate on the token ratio instead of a clip.

    loss = -f(r) A with f(r) = sigmoid(tau (r - 1)) * 4 / tau, r = exp(clamp(logp - old_logp)),
    tau = ``cfg.sapo_tau_pos`` where A > 0 and ``cfg.sapo_tau_neg`` where A <= 0 (A = 0 contributes nothing).
    The gradient w.r.t. logp is -w r A with w = f'(r) = 4 p (1 - p), p = sigmoid(tau (r - 1)): the vanilla
    policy gradient at r = 1 (w = 1), smoothly down-weighted off-policy, never exactly zero. The loss *value*
    at r = 1 is -2A/tau, not -A: compare gradients with PPO, not loss curves.

    Aggregation: verl forces ``seq-mean-token-mean`` for SAPO whatever its config says. We do NOT force it:
    the configured ``cfg.loss_agg_mode`` is used, and a SAPO recipe should set ``seq-mean-token-mean`` to
    match the paper. Metrics: ``gate_mean`` is the mean of w; clip fractions are 0 (nothing is clipped).
    """
    mask = inp.mask.to(torch.bool)
    adv = inp.advantages.detach()
    log_ratio = (inp.logp - inp.old_logp.detach()).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    tau = torch.full_like(ratio, cfg.sapo_tau_neg).masked_fill(adv > 0, cfg.sapo_tau_pos)
    p = torch.sigmoid(tau * (ratio - 1.0))
    loss = -(p * 4.0 / tau) * adv

    loss = torch.where(mask, loss, torch.zeros_like(loss))
    none = torch.zeros_like(mask)
    metrics = _metrics(mask, ratio, -log_ratio, none, none, none, 4.0 * p * (1.0 - p))
    return PolicyLossOutput(loss, metrics)


@POLICY_LOSSES.register("cispo")
def cispo(inp: PolicyLossInput, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """CISPO as the DC-CoT recipe runs it (``docs/algorithms.md`` "CISPO"): REINFORCE on every token with
    a clipped importance weight that carries no gradient,

        loss = -A * sg(clamp(r, 0, cispo_weight_max)) * logp,   r = exp(clamp(logp - old_logp)).

    Unlike a clipped surrogate, no token ever loses its gradient: a token far off-policy still gets
    -A * w * grad(logp), with w capped. The gradient equals the vanilla policy gradient -A r grad(logp) while
    r <= cispo_weight_max. The lower clip (``clip_eps_low``) is not used (the reference ignores it too).

    Metrics: ``clip_frac_high`` = ``clip_frac`` is the fraction of tokens whose weight was capped; ``gate_mean`` is
    w / r (1 when not capped); ``dual_clip_frac`` and ``clip_frac_low`` are 0.
    """
    mask = inp.mask.to(torch.bool)
    adv = inp.advantages.detach()
    log_ratio = (inp.logp.detach() - inp.old_logp.detach()).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(0.0, cfg.cispo_weight_max)
    loss = -adv * weight * inp.logp
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    none = torch.zeros_like(mask)
    metrics = _metrics(mask, ratio, -log_ratio, none, ratio > cfg.cispo_weight_max, none, weight / ratio)
    return PolicyLossOutput(loss, metrics)


def compute_policy_loss(inp: PolicyLossInput, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """Per-token loss from the policy loss named by ``cfg.policy_loss``."""
    return POLICY_LOSSES.get(cfg.policy_loss)(inp, cfg)
