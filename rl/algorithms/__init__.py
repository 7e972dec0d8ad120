"""Policy-optimization algorithms: advantage estimators and shaping, policy losses, loss aggregation, KL.

Pure functions of typed inputs (no I/O, no engines, no torch.distributed). Extension points are
registries (``ADVANTAGE_ESTIMATORS``, ``ADVANTAGE_SHAPING``, ``POLICY_LOSSES``) whose entries share one signature
each.
"""

from rl.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInput, compute_advantages, group_index
from rl.algorithms.aggregation import AGG_MODES, aggregate_loss
from rl.algorithms.config import AlgorithmConfig
from rl.algorithms.kl import KL_ESTIMATORS, kl_estimate, kl_reward_penalty
from rl.algorithms.losses import (
    POLICY_LOSS_METRICS,
    POLICY_LOSSES,
    PolicyLossInput,
    PolicyLossOutput,
    compute_policy_loss,
    masked_mean,
)
from rl.algorithms.smoothing import ADVANTAGE_SHAPING, differential_smoothing, shape_advantages

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_SHAPING",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "POLICY_LOSS_METRICS",
    "AdvantageInput",
    "AlgorithmConfig",
    "PolicyLossInput",
    "PolicyLossOutput",
    "aggregate_loss",
    "compute_advantages",
    "compute_policy_loss",
    "differential_smoothing",
    "group_index",
    "kl_estimate",
    "kl_reward_penalty",
    "masked_mean",
    "shape_advantages",
]
