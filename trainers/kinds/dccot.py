"""DC-CoT parallel reasoning (docs/dccot.md): every response is a director that spawns parallel workers.

A step: rounds of prompts (dynamic sampling when on, with the ``correct_and_format`` filter), ``n`` trajectories
each (``rollout.dccot.run_dccot``), one reward and one advantage per trajectory, broadcast to its director thread
and every worker (``rollout.dccot.to_train_samples``).
"""

from __future__ import annotations

import time

import numpy as np

from rl.algorithms import ADVANTAGE_ESTIMATORS, AdvantageInput
from rl.algorithms.dapo import keep_group
from rl.config import Config
from rl.metrics import pass_at_k
from rl.types import PromptItem, RewardResult
from trainers.kinds.base import RolloutContext, StepBatch, request_seed, result_fields
from trainers.kinds.dynamic_sampling import fill_batch


class DCCoT:
    name = "dccot"

    def __init__(self, cfg: Config) -> None:
        self.estimator = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage_estimator)

    @staticmethod
    def trajectories(ctx: RolloutContext, items: list[PromptItem], n: int, step: int, temperature: float,
                     seed_offset: int = 0):
        """``n`` DC-CoT trajectories per item (item-major), seeded from (run seed, step, slot)."""
        from rollout.dccot import TrajectoryRequest, run_dccot
        from rollout.engine import SamplingSettings

        tok = ctx.tokenizer
        reqs = [
            TrajectoryRequest(it.id, tok(it.prompt, add_special_tokens=False)["input_ids"],
                              request_seed(ctx.cfg.run.seed, step, seed_offset + i * n + j))
            for i, it in enumerate(items) for j in range(n)
        ]
        settings = SamplingSettings(temperature=temperature, top_p=ctx.cfg.rollout.top_p)
        return run_dccot(
            ctx.token_generate_fn(settings),
            lambda text: tok(text, add_special_tokens=False)["input_ids"],
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            reqs, ctx.cfg.kind,
        )

    @staticmethod
    def score(ctx: RolloutContext, items: list[PromptItem], trajs, n: int) -> list[RewardResult]:
        """Grade each trajectory's response text (``ctx.score`` with ``n`` trajectories per item); the rewards see
        its path lengths in the metadata."""
        return ctx.score(items, [trajs[i * n:(i + 1) * n] for i in range(len(items))])

    @staticmethod
    def format_valid(cfg: Config, text: str) -> bool:
        from rl.dccot import response_format_valid

        return response_format_valid(text, cfg.kind.workers_per_block, cfg.kind.max_spawn_blocks)

    def collect(self, ctx: RolloutContext, step: int) -> StepBatch:
        import torch

        from rollout.dccot import to_train_samples, trajectory_metrics

        cfg = ctx.cfg
        ds = cfg.rollout.dynamic_sampling
        n = cfg.rollout.num_samples_per_prompt
        times = {"perf/rollout_s": 0.0, "perf/reward_s": 0.0}

        def play_round(items: list[PromptItem], offset: int):
            t0 = time.perf_counter()
            trajs = self.trajectories(ctx, items, n, step, cfg.rollout.temperature, seed_offset=offset * n)
            times["perf/rollout_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            results = self.score(ctx, items, trajs, n)
            times["perf/reward_s"] += time.perf_counter() - t0
            for i, it in enumerate(items):
                tg, rs = trajs[i * n:(i + 1) * n], results[i * n:(i + 1) * n]
                fmt = [self.format_valid(cfg, t.response_text) for t in tg]
                if ds.metric == "correct_and_format":
                    keep = any(r.correct and f for r, f in zip(rs, fmt))
                else:
                    keep = keep_group([float(r.correct) for r in rs] if ds.metric == "accuracy" else [r.score for r in rs])
                yield (it, tg, rs, fmt), keep

        kept, dapo = fill_batch(ctx.sampler, ds, cfg.rollout.prompts_per_step, play_round)
        trajs = [t for k in kept for t in k[1]]
        results = [r for k in kept for r in k[2]]
        fmt = [f for k in kept for f in k[3]]
        metrics: dict[str, float] = {**times, **dapo}
        rows = self.rows(ctx, kept, trajs, results)
        if not trajs:
            metrics["rollout/tokens"] = 0.0
            return StepBatch([], metrics, rows=rows)
        rewards = torch.tensor([r.score for r in results], dtype=torch.float64)
        adv = self.estimator(AdvantageInput(rewards=rewards, group_ids=[t.prompt_id for t in trajs]), cfg.algorithm)
        samples = to_train_samples(trajs, adv.tolist())
        lengths = [t.path_lengths for t in trajs]
        metrics.update({
            **trajectory_metrics(trajs),
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std(unbiased=False)),
            "reward/accuracy": float(np.mean([r.correct for r in results])),
            "reward/format_valid_frac": float(np.mean(fmt)),
            "reward/correct_and_format_frac": float(np.mean([r.correct and f for r, f in zip(results, fmt)])),
            "rollout/num_samples": float(len(samples)),
            "rollout/num_trajectories": float(len(trajs)),
            "rollout/response_len_mean": float(np.mean([x.total_tokens for x in lengths])),
            "rollout/advantage_abs_mean": float(adv.abs().mean()),
            "rollout/tokens": float(sum(x.total_tokens for x in lengths)),
        })
        return StepBatch(samples, metrics, rows=rows)

    @staticmethod
    def rows(ctx: RolloutContext, kept, trajs, results) -> list[dict]:
        items_by_id = {it.id: it for it, *_ in kept}
        return [{"prompt_id": t.prompt_id, "prompt": items_by_id[t.prompt_id].prompt, "response": t.response_text,
                 "answer": items_by_id[t.prompt_id].answer, **result_fields(res), "end_reason": t.end_reason,
                 **t.reward_metadata()}
                for t, res in list(zip(trajs, results))[:ctx.cfg.run.log_samples_per_step]]

    def evaluate(self, ctx: RolloutContext, step: int) -> dict[str, float]:
        """Held-out accuracy of DC-CoT trajectories, with their longest path and total tokens."""
        ec = ctx.cfg.eval
        n = ec.num_samples
        t0 = time.perf_counter()
        trajs = self.trajectories(ctx, ctx.eval_items, n, step=-1 - step, temperature=ec.temperature)
        results = self.score(ctx, ctx.eval_items, trajs, n)
        ctx.end_evaluation()
        correct = np.array([r.correct for r in results], dtype=float).reshape(len(ctx.eval_items), n)
        lengths = [t.path_lengths for t in trajs]
        out = {
            "eval/accuracy": float(correct.mean()),
            "eval/num_problems": float(len(ctx.eval_items)),
            "eval/format_valid_frac": float(np.mean([self.format_valid(ctx.cfg, t.response_text) for t in trajs])),
            "eval/longest_path_mean": float(np.mean([x.longest_path_tokens for x in lengths])),
            "eval/total_tokens_mean": float(np.mean([x.total_tokens for x in lengths])),
            "eval/response_len_mean": float(np.mean([x.total_tokens for x in lengths])),
            "perf/eval_s": time.perf_counter() - t0,
        }
        if n > 1:
            out[f"eval/pass@{n}"] = float(np.mean([pass_at_k(n, int(c), n) for c in correct.sum(1)]))
        return out
