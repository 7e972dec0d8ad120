"""Multi-turn episodes: many environments stepped in lock-step by one batched generate call per turn.

Each turn collects the observation of every unfinished episode, samples one response per observation, and applies
the responses as actions. Every step keeps the exact token ids and behaviour log-probs the engine returned (the
action text is never re-tokenized), so each step is one GiGPO training sample: prompt = observation, response =
action (``docs/algorithms.md`` "GiGPO").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rl.algorithms.gigpo import GigpoConfig, GigpoResult, GigpoStep, compute_gigpo_advantages
from rl.seeding import stable_seed
from rl.types import Rollout, TrainSample
from rollout.env import StepEnv

GenerateFn = Callable[[list[str], list[int]], list[Rollout]]
"""``generate_fn(prompts, seeds) -> rollouts``: one rollout per prompt, in order, each sampled with its seed."""


@dataclass
class Step:
    """One environment step: the model saw ``prompt`` in state ``state_key`` and answered with ``action_text``.

    prompt_token_ids:   [P] as the engine tokenized the prompt.
    response_token_ids: [R] as sampled.
    logprobs:           [R] behaviour log-probs of the sampled tokens.
    reward, done, info: what the environment returned for this action.
    """

    step_index: int
    prompt: str
    state_key: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    logprobs: list[float]
    action_text: str
    finish_reason: str
    policy_version: int
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    """One trajectory. ``episode_group_id`` is shared by the trajectories that started from the same seed."""

    episode_group_id: str
    trajectory_id: str
    seed: int
    steps: list[Step] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """The environment ended the episode (False when it was cut off by ``max_steps`` of ``run_episodes``)."""
        return bool(self.steps) and self.steps[-1].done

    @property
    def episode_return(self) -> float:
        """Undiscounted sum of the step rewards."""
        return sum(s.reward for s in self.steps)


def sampling_seed(base_seed: int, group: int, group_seed: int, trajectory: int, step: int) -> int:
    """A reproducible 31-bit sampling seed, distinct per (run seed, group position, env seed, trajectory, step)."""
    return stable_seed(base_seed, group, group_seed, trajectory, step)


def run_episodes(
    generate_fn: GenerateFn,
    make_env: Callable[[], StepEnv],
    group_seeds: list[int],
    group_size: int,
    max_steps: int,
    *,
    base_seed: int = 0,
    group_id_prefix: str = "env",
) -> list[Episode]:
    """Play ``group_size`` episodes from each seed of ``group_seeds``, all environments in lock-step.

    Each turn makes exactly one ``generate_fn`` call over the observations of all unfinished episodes. An episode
    ends when its environment says done or after ``min(max_steps, env.max_steps)`` steps. Returns the episodes
    grouped by seed: ``[g0/t0, g0/t1, ..., g1/t0, ...]``; group ids are ``f"{group_id_prefix}{i}-seed{seed}"``.
    """
    if group_size < 1 or max_steps < 1:
        raise ValueError(f"group_size and max_steps must be >= 1, got {group_size} and {max_steps}")
    episodes: list[Episode] = []
    envs: list[StepEnv] = []
    observations: list[str] = []
    positions: list[tuple[int, int]] = []  # (group position, trajectory index) of each episode
    for i, seed in enumerate(group_seeds):
        group_id = f"{group_id_prefix}{i}-seed{seed}"
        for j in range(group_size):
            env = make_env()
            observations.append(env.reset(seed))
            envs.append(env)
            episodes.append(Episode(group_id, f"{group_id}/{j}", seed))
            positions.append((i, j))
    step_limit = [min(max_steps, env.max_steps) for env in envs]

    for t in range(max(step_limit, default=0)):
        live = [k for k, ep in enumerate(episodes) if not ep.done and len(ep.steps) < step_limit[k]]
        if not live:
            break
        prompts = [observations[k] for k in live]
        seeds = [sampling_seed(base_seed, positions[k][0], episodes[k].seed, positions[k][1], t) for k in live]
        rollouts = generate_fn(prompts, seeds)
        if len(rollouts) != len(live):
            raise RuntimeError(f"generate_fn returned {len(rollouts)} rollouts for {len(live)} prompts")
        for k, ro in zip(live, rollouts):
            state_key = envs[k].state_key()
            result = envs[k].step(ro.response_text)
            episodes[k].steps.append(
                Step(
                    step_index=t,
                    prompt=observations[k],
                    state_key=state_key,
                    prompt_token_ids=list(ro.prompt_token_ids),
                    response_token_ids=list(ro.response_token_ids),
                    logprobs=list(ro.logprobs),
                    action_text=ro.response_text,
                    finish_reason=ro.finish_reason,
                    policy_version=ro.policy_version,
                    reward=float(result.reward),
                    done=bool(result.done),
                    info=dict(result.info),
                )
            )
            observations[k] = result.observation
    return episodes


def gigpo_steps(episodes: Sequence[Episode]) -> list[GigpoStep]:
    """The GiGPO view of every step, in episode order then step order (the order of ``to_train_samples``)."""
    return [
        GigpoStep(ep.episode_group_id, ep.trajectory_id, s.step_index, s.state_key, s.reward)
        for ep in episodes
        for s in ep.steps
    ]


def episode_advantages(episodes: Sequence[Episode], cfg: GigpoConfig) -> GigpoResult:
    """GiGPO advantages of every step (episode return = undiscounted sum of step rewards)."""
    returns = {ep.trajectory_id: ep.episode_return for ep in episodes}
    return compute_gigpo_advantages(gigpo_steps(episodes), cfg, returns)


def to_train_samples(episodes: Sequence[Episode], advantages: Sequence[float]) -> list[TrainSample]:
    """One ``TrainSample`` per step with its advantage; ``advantages`` follows the order of ``gigpo_steps``.

    group_id is the episode group id; a step with an empty response is kept (it has no loss tokens).
    """
    samples = [
        TrainSample(
            prompt_token_ids=list(s.prompt_token_ids),
            response_token_ids=list(s.response_token_ids),
            behaviour_logprobs=list(s.logprobs),
            advantage=0.0,
            group_id=ep.episode_group_id,
        )
        for ep in episodes
        for s in ep.steps
    ]
    if len(advantages) != len(samples):
        raise ValueError(f"got {len(advantages)} advantages for {len(samples)} steps")
    for sample, adv in zip(samples, advantages):
        sample.advantage = float(adv)
    return samples


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """``rollout/`` metrics of a batch of episodes: return, length, success, cut-off and invalid-action rates."""
    n = max(len(episodes), 1)
    steps = [s for ep in episodes for s in ep.steps]
    return {
        "rollout/num_episodes": float(len(episodes)),
        "rollout/num_steps": float(len(steps)),
        "rollout/episode_return_mean": sum(ep.episode_return for ep in episodes) / n,
        "rollout/episode_steps_mean": len(steps) / n,
        "rollout/episode_success_frac": sum(any(s.info.get("success") for s in ep.steps) for ep in episodes) / n,
        "rollout/episode_cut_off_frac": sum(not ep.done for ep in episodes) / n,
        "rollout/invalid_action_frac": sum(bool(s.info.get("invalid_action")) for s in steps) / max(len(steps), 1),
    }
