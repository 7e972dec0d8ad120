"""Advantage estimators: one scalar advantage per sample from its group's rewards.

Every entry of ``ADVANTAGE_ESTIMATORS`` has the signature ``fn(inp: AdvantageInput, cfg:
AlgorithmConfig) -> Tensor [N]``; the learner broadcasts each sample's advantage to its loss tokens.
Formulas: ``docs/algorithms.md`` "GRPO and RLOO advantages".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rl.registry import Registry

if TYPE_CHECKING:
    from rl.algorithms.config import AlgorithmConfig


@dataclass
class AdvantageInput:
    """Rewards of a batch of samples and the group (prompt) each belongs to.

    rewards:   [N] float, the (shaped) scalar reward of each sample.
    group_ids: N strings; samples with the same id are responses to the same prompt. Groups may have
               different sizes and need not be contiguous.
    """

    rewards: Tensor
    group_ids: list[str]

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1 or not self.rewards.is_floating_point():
            shape, dtype = tuple(self.rewards.shape), self.rewards.dtype
            raise ValueError(f"rewards must be a 1-D float tensor [N], got {shape} {dtype}")
        if len(self.group_ids) != self.rewards.numel():
            raise ValueError(f"got {len(self.group_ids)} group_ids for {self.rewards.numel()} rewards")


AdvantageFn = Callable[[AdvantageInput, "AlgorithmConfig"], Tensor]

ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry(
    "advantage estimator",
    capabilities={
        "needs_ref_logprobs": False,  # reads reference-policy log-probs
        "needs_sequence_logprobs": False,  # reads per-sample sequence log-probs (e.g. differential smoothing)
        "needs_step_ids": False,  # reads per-step ids of multi-turn episodes (e.g. GiGPO)
        "uses_std_norm": False,  # reads cfg.norm_adv_by_std / std_mode / adv_eps
    },
)


def group_index(group_ids: list[str]) -> tuple[Tensor, int]:
    """Map group ids to dense indices in order of first appearance: ([N] long, number of groups)."""
    dense: dict[str, int] = {}
    index = [dense.setdefault(g, len(dense)) for g in group_ids]
    return torch.tensor(index, dtype=torch.long), len(dense)


@dataclass
class _GroupStats:
    """Per-sample statistics of each sample's group, float64. All tensors [N]."""

    count: Tensor
    mean: Tensor
    sq_dev_sum: Tensor  # sum over the group of (R - mean)^2
    constant: Tensor  # bool: every reward in the group is identical (includes singletons)


def _group_stats(inp: AdvantageInput) -> _GroupStats:
    r = inp.rewards.detach().to(torch.float64)
    idx, num_groups = group_index(inp.group_ids)
    idx = idx.to(r.device)
    zeros = r.new_zeros(num_groups)
    count = zeros.index_add(0, idx, torch.ones_like(r))
    mean = zeros.index_add(0, idx, r) / count.clamp(min=1)
    sq_dev_sum = zeros.index_add(0, idx, (r - mean[idx]) ** 2)
    gmax = zeros.scatter_reduce(0, idx, r, "amax", include_self=False)
    gmin = zeros.scatter_reduce(0, idx, r, "amin", include_self=False)
    return _GroupStats(count[idx], mean[idx], sq_dev_sum[idx], (gmax == gmin)[idx])


@ADVANTAGE_ESTIMATORS.register("grpo", uses_std_norm=True)
def grpo(inp: AdvantageInput, cfg: AlgorithmConfig) -> Tensor:
    """GRPO: A_i = (R_i - mean_g) / (std_g + eps), or R_i - mean_g when ``cfg.norm_adv_by_std`` is off (Dr. GRPO).

    std follows ``cfg.std_mode`` (sample: n-1, population: n). A group whose rewards are all equal
    gets exactly 0, with no NaN. A singleton group also gets 0: it has no baseline, and verl's
    raw-reward fallback (mean 0, std 1) would train on an unnormalized reward that silently
    differs in scale from every other sample.
    """
    s = _group_stats(inp)
    r = inp.rewards.detach().to(torch.float64)
    adv = r - s.mean
    if cfg.norm_adv_by_std:
        dof = s.count - 1 if cfg.std_mode == "sample" else s.count
        std = (s.sq_dev_sum / dof.clamp(min=1)).sqrt()
        adv = adv / (std + cfg.adv_eps)
    adv = torch.where(s.constant, torch.zeros_like(adv), adv)
    return adv.to(inp.rewards.dtype)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo(inp: AdvantageInput, cfg: AlgorithmConfig) -> Tensor:
    """RLOO: A_i = R_i - mean_{j != i} R_j = n/(n-1) (R_i - mean_g) (Ahmadian et al. 2024, arXiv 2402.14740).

    Not std-normalized (``cfg.norm_adv_by_std`` is ignored). Singletons and all-equal groups get 0.
    """
    s = _group_stats(inp)
    r = inp.rewards.detach().to(torch.float64)
    adv = (r - s.mean) * s.count / (s.count - 1).clamp(min=1)
    adv = torch.where(s.constant, torch.zeros_like(adv), adv)
    return adv.to(inp.rewards.dtype)


def compute_advantages(inp: AdvantageInput, cfg: AlgorithmConfig) -> Tensor:
    """Advantages [N] from the estimator named by ``cfg.advantage_estimator``."""
    return ADVANTAGE_ESTIMATORS.get(cfg.advantage_estimator)(inp, cfg)
