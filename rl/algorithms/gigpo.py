"""GiGPO: Group-in-Group Policy Optimization (Feng et al., arXiv 2505.10978; verl-agent ``gigpo/core_gigpo.py``).

Multi-turn, step-wise RL: every environment step of an episode is one training sample whose response is the
action text. Its advantage combines two groupings (formulas: ``docs/algorithms.md`` "GiGPO"):

- episode group (trajectories that start from the same initial state):
  ``A^E(tau) = (R(tau) - mean_group R) / F_norm``
- anchor-state group (steps of one episode group that saw the same environment state):
  ``A^S(step) = (R_t - mean_anchor R_t) / F_norm`` with discounted step returns ``R_t = sum_k gamma^(k-t) r_k``
- combined: ``A = A^E + omega * A^S``, broadcast by the learner to every token of the step's response.

``F_norm`` is 1 (``mean_norm``) or the group std (``mean_std_norm``). Pure Python over floats: no torch needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from rl.schema import StrictModel

NormMode = Literal["mean_norm", "mean_std_norm"]


class GigpoConfig(StrictModel):
    """Discounting, weighting and normalization of GiGPO advantages (defaults: verl-agent scripts;
    ``docs/algorithms.md`` "GiGPO")."""

    _kind: ClassVar[str] = "gigpo"

    gamma: float = Field(
        0.95,
        ge=0.0,
        le=1.0,
        description="Discount of step returns R_t = sum_k gamma^(k-t) r_k, per environment step (not per token). "
        "verl-agent `algorithm.gamma` = 0.95 in its ALFWorld/WebShop/Sokoban scripts.",
    )
    omega: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the step (anchor-state) advantage: A = A^E + omega * A^S. verl-agent "
        "`algorithm.gigpo.step_advantage_w` = 1.0 (the paper's 1:1). 0 reduces GiGPO to episode-level GRPO.",
    )
    step_norm: NormMode = Field(
        "mean_norm",
        description="Normalization of A^S within an anchor group. `mean_norm`: R_t - mean (F_norm = 1; verl-agent's "
        "function default). `mean_std_norm`: (R_t - mean) / (std + eps) (verl-agent ALFWorld examples); noisy when "
        "anchor groups are small.",
    )
    episode_norm: NormMode = Field(
        "mean_norm",
        description="Normalization of A^E within an episode group, same modes as `step_norm`. verl-agent uses one "
        "`mode` for both; set both fields alike to reproduce it.",
    )
    std_mode: Literal["sample", "population"] = Field(
        "sample",
        description="Std convention of the `mean_std_norm` modes: `sample` (n-1, torch.std, as verl-agent) or "
        "`population` (1/n).",
    )
    eps: float = Field(
        1e-6, ge=0.0, description="Added to the std before dividing in `mean_std_norm` (verl-agent 1e-6)."
    )



@dataclass(frozen=True)
class GigpoStep:
    """One environment step of one trajectory.

    episode_group_id: trajectories sharing it started from the same initial state (same task and seed).
    trajectory_id:    unique across the whole batch (not only within its episode group).
    step_index:       0-based position of the step in its trajectory; a trajectory's indices are 0..T-1.
    state_key:        canonical environment state the action was taken in (the anchor). Must not contain a step
                      counter or history text, or every anchor group becomes a singleton.
    step_reward:      reward the environment returned for this step.
    """

    episode_group_id: str
    trajectory_id: str
    step_index: int
    state_key: Hashable
    step_reward: float


@dataclass
class GigpoResult:
    """Per-step outputs, each a list aligned with the input steps ([S]), plus ``gigpo/`` metrics.

    advantages:         [S] A^E + omega * A^S, what the learner trains on.
    episode_advantages: [S] A^E of the step's trajectory.
    step_advantages:    [S] A^S of the step (before omega).
    step_returns:       [S] discounted return R_t from the step on.
    metrics:            number and mean size of anchor groups, fraction of steps in anchor groups of size > 1,
                        step-advantage share mean|omega A^S| / (mean|A^E| + mean|omega A^S|).
    """

    advantages: list[float]
    episode_advantages: list[float]
    step_advantages: list[float]
    step_returns: list[float]
    metrics: dict[str, float]


def _centre(values: list[float], mode: NormMode, cfg: GigpoConfig) -> list[float]:
    """Group-normalized values. Singletons and all-equal groups get exactly 0 (no baseline / no signal)."""
    n = len(values)
    if n < 2 or max(values) == min(values):
        return [0.0] * n
    mean = math.fsum(values) / n
    dev = [v - mean for v in values]
    if mode == "mean_std_norm":
        dof = n - 1 if cfg.std_mode == "sample" else n
        std = math.sqrt(math.fsum(d * d for d in dev) / dof)
        dev = [d / (std + cfg.eps) for d in dev]
    return dev


def _check_steps(steps: Sequence[GigpoStep]) -> dict[str, list[int]]:
    """Positions of each trajectory's steps in step order; ValueError on inconsistent ids or indices."""
    by_traj: dict[str, list[int]] = defaultdict(list)
    group_of: dict[str, str] = {}
    for pos, s in enumerate(steps):
        if group_of.setdefault(s.trajectory_id, s.episode_group_id) != s.episode_group_id:
            raise ValueError(
                f"trajectory {s.trajectory_id!r} appears in episode groups {group_of[s.trajectory_id]!r} and "
                f"{s.episode_group_id!r}; trajectory ids must be unique across the batch"
            )
        by_traj[s.trajectory_id].append(pos)
    for traj, positions in by_traj.items():
        positions.sort(key=lambda p: steps[p].step_index)
        indices = [steps[p].step_index for p in positions]
        if indices != list(range(len(indices))):
            raise ValueError(f"trajectory {traj!r} has step indices {indices}; expected 0..{len(indices) - 1}")
    return by_traj


def compute_gigpo_advantages(
    steps: Sequence[GigpoStep],
    cfg: GigpoConfig,
    episode_returns: Mapping[str, float] | None = None,
) -> GigpoResult:
    """GiGPO advantages of every step (``docs/algorithms.md`` "GiGPO"); outputs are aligned with ``steps``, which
    may come in any order.

    episode_returns: trajectory id -> episode return R(tau). None: the undiscounted sum of the trajectory's step
                     rewards (what verl-agent's episode reward manager places on each step).

    Deviation from verl-agent: a singleton episode group gets A^E = 0, as in this repo's GRPO, instead of its raw
    return (verl-agent's mean 0, std 1 fallback), which would have a different scale from every other sample.
    """
    by_traj = _check_steps(steps)
    if episode_returns is None:
        episode_returns = {t: math.fsum(steps[p].step_reward for p in pos) for t, pos in by_traj.items()}
    missing = [t for t in by_traj if t not in episode_returns]
    if missing:
        raise ValueError(f"no episode return for trajectories {missing[:5]}")

    # Discounted step returns, backwards through each trajectory.
    step_returns = [0.0] * len(steps)
    for positions in by_traj.values():
        running = 0.0
        for p in reversed(positions):
            running = steps[p].step_reward + cfg.gamma * running
            step_returns[p] = running

    # Episode advantage: one value per trajectory, normalized within its episode group.
    trajs_of_group: dict[str, list[str]] = defaultdict(list)
    for traj, positions in by_traj.items():
        trajs_of_group[steps[positions[0]].episode_group_id].append(traj)
    traj_adv: dict[str, float] = {}
    for trajs in trajs_of_group.values():
        centred = _centre([float(episode_returns[t]) for t in trajs], cfg.episode_norm, cfg)
        traj_adv.update(zip(trajs, centred))
    episode_adv = [traj_adv[s.trajectory_id] for s in steps]

    # Step advantage: anchor groups are identical states within one episode group, never across groups.
    anchors: dict[tuple[str, Hashable], list[int]] = defaultdict(list)
    for pos, s in enumerate(steps):
        anchors[(s.episode_group_id, s.state_key)].append(pos)
    step_adv = [0.0] * len(steps)
    for positions in anchors.values():
        for p, a in zip(positions, _centre([step_returns[p] for p in positions], cfg.step_norm, cfg)):
            step_adv[p] = a

    advantages = [e + cfg.omega * a for e, a in zip(episode_adv, step_adv)]
    return GigpoResult(advantages, episode_adv, step_adv, step_returns, _metrics(anchors, episode_adv, step_adv, cfg))


def _metrics(
    anchors: Mapping[Any, list[int]], episode_adv: list[float], step_adv: list[float], cfg: GigpoConfig
) -> dict[str, float]:
    num_steps = len(step_adv)
    sizes = [len(p) for p in anchors.values()]
    mean_abs_e = math.fsum(abs(a) for a in episode_adv) / max(num_steps, 1)
    mean_abs_s = math.fsum(abs(cfg.omega * a) for a in step_adv) / max(num_steps, 1)
    denom = mean_abs_e + mean_abs_s
    return {
        "gigpo/num_steps": float(num_steps),
        "gigpo/num_anchor_groups": float(len(sizes)),
        "gigpo/anchor_group_size_mean": num_steps / len(sizes) if sizes else 0.0,
        "gigpo/anchored_step_frac": sum(n for n in sizes if n > 1) / num_steps if num_steps else 0.0,
        "gigpo/episode_adv_abs_mean": mean_abs_e,
        "gigpo/step_adv_abs_mean": mean_abs_s,
        "gigpo/step_adv_share": mean_abs_s / denom if denom > 0 else 0.0,
    }
