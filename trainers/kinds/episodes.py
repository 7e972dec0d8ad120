"""Multi-turn environment episodes (``rollout.env``), with GiGPO's episode- and step-level advantages.

A step plays ``groups_per_step`` groups of ``group_size`` episodes (each group from one start state), one batched
engine call per turn (``rollout.multiturn.run_episodes``); every turn is one learner sample.
"""

from __future__ import annotations

import time

import numpy as np

from rl.config import Config
from rl.types import Rollout
from trainers.kinds.base import RolloutContext, StepBatch, request_seed


class Episodes:
    name = "episodes"

    def __init__(self, cfg: Config) -> None:
        from rollout.env import make_env

        mt = cfg.kind
        make_env(mt.env, **mt.env_options)  # fail now on a bad name or option

    @staticmethod
    def play(ctx: RolloutContext, group_seeds: list[int], group_size: int, temperature: float, prefix: str):
        from rollout.engine import GenerationRequest, SamplingSettings
        from rollout.env import make_env
        from rollout.multiturn import run_episodes

        mt = ctx.cfg.kind
        settings = SamplingSettings(temperature=temperature, top_p=ctx.cfg.rollout.top_p,
                                    max_tokens=ctx.cfg.rollout.max_response_tokens)

        def generate_fn(prompts: list[str], seeds: list[int]) -> list[Rollout]:
            reqs = [GenerationRequest(f"turn-{i}", p, 1, seed) for i, (p, seed) in enumerate(zip(prompts, seeds))]
            return [group[0] for group in ctx.dispatch(reqs, settings)]

        return run_episodes(generate_fn, lambda: make_env(mt.env, **mt.env_options), group_seeds, group_size,
                            mt.max_turns, base_seed=ctx.cfg.run.seed, group_id_prefix=prefix)

    def collect(self, ctx: RolloutContext, step: int) -> StepBatch:
        """Play ``groups_per_step`` x ``group_size`` episodes, GiGPO advantages, one sample per turn."""
        from rollout.multiturn import episode_advantages, episode_metrics, to_train_samples

        mt = ctx.cfg.kind
        t0 = time.perf_counter()
        seeds = [request_seed(ctx.cfg.run.seed, step, i) for i in range(mt.groups_per_step)]
        episodes = self.play(ctx, seeds, mt.group_size, ctx.cfg.rollout.temperature, prefix=f"s{step}-g")
        t_gen = time.perf_counter() - t0
        result = episode_advantages(episodes, mt.gigpo)
        samples = to_train_samples(episodes, result.advantages)
        lengths = np.array([len(s.response_token_ids) for s in samples])
        metrics = {
            **episode_metrics(episodes),
            **result.metrics,
            "reward/mean": float(np.mean([ep.episode_return for ep in episodes])),
            "reward/accuracy": float(np.mean([any(st.info.get("success") for st in ep.steps) for ep in episodes])),
            "rollout/response_len_mean": float(lengths.mean()) if len(lengths) else 0.0,
            "rollout/advantage_abs_mean": float(np.mean(np.abs(result.advantages))) if samples else 0.0,
            "perf/rollout_s": t_gen,
            "perf/reward_s": 0.0,
            "rollout/tokens": float(lengths.sum()),
        }
        turns = [(ep, st) for ep in episodes for st in ep.steps][:ctx.cfg.run.log_samples_per_step]
        rows = [{"trajectory_id": ep.trajectory_id, "turn": st.step_index, "prompt": st.prompt,
                 "response": st.action_text, "reward": st.reward, "state": st.state_key, "info": st.info}
                for ep, st in turns]
        return StepBatch(samples, metrics, rows=rows)

    def evaluate(self, ctx: RolloutContext, step: int) -> dict[str, float]:
        """Success rate on held-out start states (seeds >= 2**31, never drawn for training)."""
        from rollout.multiturn import episode_metrics

        ec, mt = ctx.cfg.eval, ctx.cfg.kind
        t0 = time.perf_counter()
        seeds = [2**31 + i for i in range(mt.eval_groups)]
        episodes = self.play(ctx, seeds, ec.num_samples, ec.temperature, prefix="eval-g")
        m = episode_metrics(episodes)
        return {
            "eval/accuracy": m["rollout/episode_success_frac"],
            "eval/episode_return_mean": m["rollout/episode_return_mean"],
            "eval/episode_steps_mean": m["rollout/episode_steps_mean"],
            "eval/invalid_action_frac": m["rollout/invalid_action_frac"],
            "perf/eval_s": time.perf_counter() - t0,
        }
