"""DAPO's batch-level pieces (Yu et al. 2025, arXiv 2503.14476): overlong shaping and group filtering.

The loss side of DAPO is configuration of the shared PPO loss (``clip_eps_high=0.28``, ``dual_clip_c=10``,
``loss_agg_mode=token-mean``, no KL). What lives here acts on whole samples and groups, before advantages:

- **Soft overlong punishment** (``overlong_penalty``, defined in ``rl.shaping`` and shared with the reward
  functions): a length penalty added to the reward of responses that run into the last ``buffer_len`` tokens
  of the budget, linear from 0 to ``-penalty_factor`` at the budget.
- **Overlong filtering**: truncated responses get no loss (the driver zeroes their loss mask).
- **Dynamic sampling** (``keep_group``): groups whose filter metric is constant carry no GRPO signal and are
  dropped; generation continues until the batch is full (``trainers.kinds.dynamic_sampling``).

Formulas and hand-computed cases: ``docs/algorithms.md`` "DAPO" and "Overlong penalty".
"""

from __future__ import annotations

from collections.abc import Sequence

from rl.shaping import overlong_penalty

__all__ = ["keep_group", "overlong_penalty"]


def keep_group(metric_values: Sequence[float]) -> bool:
    """Dynamic-sampling filter: keep a group iff its metric varies, or it has a single sample.

    A group whose samples all score the same has all-zero GRPO advantages: it costs learner time and
    shrinks the effective batch. Singleton groups are kept (as verl does); they have no group baseline.
    """
    if len(metric_values) == 0:
        return False
    return len(metric_values) == 1 or max(metric_values) != min(metric_values)
