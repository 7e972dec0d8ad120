"""A rollout kind of one's own, in one file: two attempts per prompt ("retry").

Each prompt gets ``rollout.num_samples_per_prompt`` first attempts; every wrong one gets a second turn whose prompt
is the first turn's prompt and answer followed by ``options.feedback``. An attempt's reward is whether its last turn
is right, less ``options.retry_cost`` when it needed the second turn; advantages are the configured estimator's over
each prompt's attempts, and every turn of an attempt trains with its attempt's advantage.

Run it (docs/rollout_kinds.md)::

    rl train configs/tiny_cpu.yaml 'kind={name: plugin, path: docs/examples/retry_kind.py:Retry, options: {retry_cost: 0.2}}'
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from rl.algorithms import ADVANTAGE_ESTIMATORS, AdvantageInput
from rl.types import PromptItem, TrainSample
from trainers.kinds.base import RolloutContext, StepBatch, result_fields


class Retry:
    name = "retry"

    class Options(BaseModel):
        """``kind.options``: checked when the run starts, an unknown key is an error."""

        model_config = ConfigDict(extra="forbid")
        feedback: str = Field("\nThat is not right. Try again.\n", description="Text after a wrong first answer.")
        retry_cost: float = Field(0.2, ge=0.0, description="Subtracted from an attempt that needed the second turn.")

    def __init__(self, cfg, options: Options) -> None:
        self.options = options
        self.estimator = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage_estimator)

    def attempts(self, ctx: RolloutContext, items: list[PromptItem], n: int, step: int, temperature: float,
                 max_tokens: int):
        """Per attempt (item-major): its turns as (prompt item, rollout, graded result) and its reward."""
        first = ctx.generate(items, n, step, temperature, max_tokens)
        first_graded = ctx.score(items, first)
        turns = [[(it, r, first_graded[i * n + j])] for i, it in enumerate(items) for j, r in enumerate(first[i])]
        wrong = [k for k, t in enumerate(turns) if not t[0][2].correct]
        retry_items = [PromptItem(f"{turns[k][0][0].id}/retry", turns[k][0][0].prompt + turns[k][0][1].response_text
                                  + self.options.feedback, turns[k][0][0].answer, turns[k][0][0].metadata) for k in wrong]
        if retry_items:  # seeded after every first-turn slot, so no request shares a seed
            second = ctx.generate(retry_items, 1, step, temperature, max_tokens, seed_offset=len(items))
            for k, it, group, res in zip(wrong, retry_items, second, ctx.score(retry_items, second)):
                turns[k].append((it, group[0], res))
        rewards = [float(t[-1][2].correct) - self.options.retry_cost * (len(t) - 1) for t in turns]
        return turns, rewards

    def collect(self, ctx: RolloutContext, step: int) -> StepBatch:
        cfg = ctx.cfg
        n = cfg.rollout.num_samples_per_prompt
        items = ctx.sampler.next(cfg.rollout.prompts_per_step)
        t0 = time.perf_counter()
        turns, rewards = self.attempts(ctx, items, n, step, cfg.rollout.temperature, cfg.rollout.max_response_tokens)
        took = time.perf_counter() - t0
        group_ids = [it.id for it in items for _ in range(n)]
        adv = self.estimator(AdvantageInput(rewards=torch.tensor(rewards, dtype=torch.float64), group_ids=group_ids),
                             cfg.algorithm).tolist()
        samples = [TrainSample(r.prompt_token_ids, r.response_token_ids, r.logprobs, a, gid)
                   for t, a, gid in zip(turns, adv, group_ids) for _, r, _ in t]
        rows = [{"prompt_id": it.id, "prompt": it.prompt, "response": r.response_text, "answer": it.answer,
                 "turn": k, **result_fields(res)}
                for t in turns for k, (it, r, res) in enumerate(t)][:cfg.run.log_samples_per_step]
        metrics = {
            "reward/mean": float(np.mean(rewards)),
            "reward/accuracy": float(np.mean([t[-1][2].correct for t in turns])),
            "retry/first_turn_accuracy": float(np.mean([t[0][2].correct for t in turns])),
            "retry/second_turn_frac": float(np.mean([len(t) == 2 for t in turns])),
            "rollout/num_samples": float(len(samples)),
            "rollout/tokens": float(sum(len(s.response_token_ids) for s in samples)),
            "perf/rollout_s": took,
        }
        return StepBatch(samples, metrics, rows=rows)

    def evaluate(self, ctx: RolloutContext, step: int) -> dict[str, float]:
        ec = ctx.cfg.eval
        turns, _ = self.attempts(ctx, ctx.eval_items, ec.num_samples, -1 - step, ec.temperature,
                                 ec.max_response_tokens or ctx.cfg.rollout.max_response_tokens)
        ctx.end_evaluation()
        return {"eval/accuracy": float(np.mean([t[-1][2].correct for t in turns])),
                "eval/first_turn_accuracy": float(np.mean([t[0][2].correct for t in turns]))}
