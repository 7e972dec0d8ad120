"""DAPO's batch-level pieces (Yu et al. 2025, arXiv 2503.14476): overlong shaping and group filtering.

The loss side of DAPO is configuration of the shared PPO loss (``clip_eps_high=0.28``, ``dual_clip_c=10``,
``loss_agg_mode=token-mean``, no KL). What lives here acts on whole samples and groups, before advantages:

- **Soft overlong punishment** (``overlong_penalty``): a length penalty added to the reward of responses
  that run into the last ``buffer_len`` tokens of the budget, linear from 0 to ``-penalty_factor`` at the
  budget (verl's ``DAPORewardManager`` form).
- **Overlong filtering**: truncated responses get no loss (the driver zeroes their loss mask).
- **Dynamic sampling** (``keep_group``): groups whose filter metric is constant carry no GRPO signal and are
  dropped; the driver keeps generating until the batch is full (``rl.driver``).

Formulas and hand-computed cases: ``docs/algorithms.md`` "DAPO" and "Overlong penalty".
"""

from __future__ import annotations

from collections.abc import Sequence


def overlong_penalty(length: int, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> float:
    """Soft overlong punishment of one response of ``length`` tokens, to be added to its reward.

    0 while ``length <= max_len - buffer_len``; then ``-(length - (max_len - buffer_len)) / buffer_len *
    penalty_factor``, reaching ``-penalty_factor`` at ``length == max_len`` (and capped there beyond it).
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"overlong buffer_len must be in 1..max_len={max_len}, got {buffer_len}")
    expected = max_len - buffer_len
    excess = min(length, max_len) - expected
    return min(-excess / buffer_len * penalty_factor, 0.0) + 0.0  # + 0.0 turns -0.0 into 0.0


def keep_group(metric_values: Sequence[float]) -> bool:
    """Dynamic-sampling filter: keep a group iff its metric varies, or it has a single sample.

    A group whose samples all score the same has all-zero GRPO advantages: it costs learner time and
    shrinks the effective batch. Singleton groups are kept (as verl does); they have no group baseline.
    """
    if len(metric_values) == 0:
        return False
    return len(metric_values) == 1 or max(metric_values) != min(metric_values)
