"""Per-token KL estimators between the current policy and a reference policy (Schulman, "Approximating
KL divergence", 2020; verl ``kl_penalty``). Formulas: ``docs/algorithms.md`` "KL".

With d = logp - ref_logp, on tokens sampled from the current policy:

- ``k1`` = d                                  unbiased, can be negative, high variance
- ``k2`` = d^2 / 2                            biased, >= 0
- ``k3`` = exp(-d) + d - 1                    unbiased, >= 0, low variance (GRPO's choice); the
  log-difference is clamped to +-20 and the result to +-10, as in verl
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")
_K3_LOG_CLAMP = 20.0
_K3_VALUE_CLAMP = 10.0


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-token KL estimate [T] of KL(pi || pi_ref); gradients flow to ``logp`` (``ref_logp`` is a constant)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    d = logp - ref_logp.detach()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        neg_d = (-d).clamp(-_K3_LOG_CLAMP, _K3_LOG_CLAMP)
        return (torch.exp(neg_d) - neg_d - 1.0).clamp(-_K3_VALUE_CLAMP, _K3_VALUE_CLAMP)
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def kl_reward_penalty(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    seq_index: Tensor,
    num_seqs: int,
    kl_coef: float,
    estimator: Literal["k1", "k2", "k3"] = "k1",
) -> Tensor:
    """Per-sequence KL penalty [num_seqs] = kl_coef * sum over masked tokens of the KL estimate, detached.

    For ``kl_in="reward"``: subtract it from each sample's scalar reward before computing advantages
    (outcome-reward estimators take one reward per sample, so the per-token penalty is summed per
    sequence). ``logp`` here are the behaviour/old log-probs of the sampled tokens.
    """
    kl = kl_estimate(logp.detach(), ref_logp, estimator) * mask.to(logp.dtype)
    per_seq = kl.new_zeros(num_seqs).index_add(0, seq_index, kl)
    return kl_coef * per_seq
