"""Single-turn prompts: one response per sample, graded by the reward pool (GRPO and its relatives).

A step: rounds of prompts (DAPO's dynamic sampling when on, ``fill_batch``), ``n`` responses each (per prompt with
Rollout-GDRO), graded and shaped (DAPO's overlong penalty) -> rewards minus the KL penalty (``kl_in=reward``) ->
advantage estimator -> advantage shaping (differential smoothing) -> Prompt-GDRO weights -> learner samples.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rl.algorithms import ADVANTAGE_ESTIMATORS, AdvantageInput
from rl.algorithms.dapo import keep_group, overlong_penalty
from rl.algorithms.smoothing import shape_advantages
from rl.config import Config
from rl.metrics import pass_at_k
from rl.types import PromptItem, RewardResult, Rollout, TrainSample
from trainers.kinds.base import RolloutContext, StepBatch, result_fields, split
from trainers.kinds.dynamic_sampling import fill_batch


INITIAL_EVAL_FILE = "eval_initial.json"


def initially_unsolved_accuracy(path: Path, step: int, ids: list[str], correct: np.ndarray) -> dict[str, float]:
    """``eval/hard_accuracy``: accuracy on the held-out problems that no sample solved at step 0 (the hard bin
    GDRO aims at), with ``eval/hard_problems`` (how many). Step 0's per-problem counts are written to ``path``
    (atomically; a resumed run reads them back); nothing when the file is missing or holds other problems or
    another number of samples per problem."""
    counts = [int(c) for c in correct.sum(1)]
    n = int(correct.shape[1])
    if step == 0:  # a new run (a resumed one does not evaluate step 0 again)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"ids": ids, "num_samples": n, "correct": counts}))
        os.replace(tmp, path)
    if not path.exists():
        return {}
    initial = json.loads(path.read_text())
    if initial["ids"] != ids or initial["num_samples"] != n:
        return {}
    hard = np.array(initial["correct"]) == 0
    if not hard.any():
        return {"eval/hard_problems": 0.0}
    return {"eval/hard_accuracy": float(correct[hard].mean()), "eval/hard_problems": float(hard.sum())}


class SingleTurn:
    name = "single_turn"

    def __init__(self, cfg: Config) -> None:
        self.estimator = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage_estimator)

    # ------------------------------------------------------------------ a step
    def collect(self, ctx: RolloutContext, step: int) -> StepBatch:
        items, groups, results, stats, seen = self.rollout(ctx, step)
        samples, metrics, raw_advantages = self.build_samples(ctx, items, groups, results)
        metrics.update(stats)
        # GDRO's feedback travels with the batch (async mode prepares the next batch before this one's update), as
        # do the decisions it made for it.
        feedback = {"gdro": (seen, raw_advantages, ctx.gdro.decision_metrics())} if ctx.gdro is not None else {}
        return StepBatch(samples, metrics, rows=self.rows(ctx, items, groups, results), feedback=feedback)

    def rollout(self, ctx: RolloutContext, step: int):
        """Prompts, their response groups and graded (shaped) results for one step, the rollout metrics, and every
        graded group of the step as ``(prompt id, correctness per sample)``, kept or not (GDRO's feedback)."""
        cfg = ctx.cfg
        ds = cfg.rollout.dynamic_sampling
        stats = {"perf/rollout_s": 0.0, "perf/reward_s": 0.0, "rollout/tokens": 0.0}
        shaping: dict[str, list[float]] = {}
        seen: list[tuple[str, list[bool]]] = []

        def play_round(items: list[PromptItem], offset: int):
            counts = (ctx.gdro.n_per_prompt([it.id for it in items]) if ctx.gdro is not None
                      else cfg.rollout.num_samples_per_prompt)
            t0 = time.perf_counter()
            groups = ctx.generate(items, counts, step, cfg.rollout.temperature, cfg.rollout.max_response_tokens,
                                  seed_offset=offset)
            stats["perf/rollout_s"] += time.perf_counter() - t0
            stats["rollout/tokens"] += sum(len(r.response_token_ids) for g in groups for r in g)
            t0 = time.perf_counter()
            results, shape_stats = self.shape_rewards(cfg, groups, ctx.score(items, groups))
            stats["perf/reward_s"] += time.perf_counter() - t0
            for key, value in shape_stats.items():
                shaping.setdefault(key, []).append(value)
            graded = split(results, [len(g) for g in groups])
            seen.extend((it.id, [r.correct for r in rs]) for it, rs in zip(items, graded))
            for it, g, rs in zip(items, groups, graded):
                values = [float(r.correct) for r in rs] if ds.metric == "accuracy" else [r.score for r in rs]
                yield (it, g, rs), keep_group(values)

        kept, dapo = fill_batch(ctx.sampler, ds, cfg.rollout.prompts_per_step, play_round)
        stats.update({key: float(np.mean(v)) for key, v in shaping.items()})
        stats.update(dapo)
        return [k[0] for k in kept], [k[1] for k in kept], [r for k in kept for r in k[2]], stats, seen

    @staticmethod
    def shape_rewards(cfg: Config, groups: list[list[Rollout]], results: list[RewardResult]):
        """DAPO's soft overlong punishment, added to each graded score (``shaping.overlong_*``)."""
        sc = cfg.shaping
        if not sc.overlong_buffer_len:
            return results, {}
        max_len = cfg.rollout.max_response_tokens
        flat = [r for g in groups for r in g]
        penalties = [overlong_penalty(len(r.response_token_ids), max_len, sc.overlong_buffer_len,
                                      sc.overlong_penalty_factor) for r in flat]
        shaped = [replace(res, score=res.score + p) for res, p in zip(results, penalties)]
        return shaped, {"shaping/overlong_penalty_mean": float(np.mean(penalties)),
                        "shaping/overlong_frac": float(np.mean([p < 0 for p in penalties]))}

    def build_samples(self, ctx: RolloutContext, items, groups, results):
        """The learner's samples: rewards (minus the KL penalty with ``kl_in=reward``) -> advantage estimator ->
        advantage shaping -> Prompt-GDRO weights. Also the metrics and the unweighted advantages by prompt id."""
        import torch

        flat = [r for g in groups for r in g]
        rewards = np.array([r.score for r in results], dtype=np.float64)
        group_ids = [g[0].prompt_id for g in groups for _ in g]
        stats: dict[str, float] = {}
        raw_advantages: dict[str, list[float]] = {}
        if not flat:
            return [], {"rollout/num_samples": 0.0}, raw_advantages
        algo = ctx.cfg.algorithm
        mask_truncated = ctx.cfg.shaping.mask_truncated
        masks = [[0] * len(r.response_token_ids) if mask_truncated and r.finish_reason == "length" else None
                 for r in flat]
        if algo.kl_coef > 0 and algo.kl_in == "reward":
            pre = [TrainSample(r.prompt_token_ids, r.response_token_ids, r.logprobs, 0.0, gid, loss_mask=m)
                   for r, gid, m in zip(flat, group_ids, masks)]
            penalties = np.array(ctx.learner.call("kl_reward_penalties", pre))
            stats["kl/reward_penalty_mean"] = float(penalties.mean())
        else:
            penalties = np.zeros_like(rewards)
        adv = self.estimator(AdvantageInput(rewards=torch.tensor(rewards - penalties), group_ids=group_ids), algo)
        for gid, a in zip(group_ids, adv.tolist()):
            raw_advantages.setdefault(gid, []).append(a)
        if algo.advantage_shaping != "none":
            adv, ds_stats = shape_advantages(
                adv,
                torch.tensor([r.correct for r in results], dtype=torch.bool),
                torch.tensor([float(sum(r.logprobs)) for r in flat], dtype=adv.dtype),
                torch.tensor([len(r.response_token_ids) for r in flat], dtype=adv.dtype),
                algo,
            )
            stats.update(ds_stats)
        if ctx.gdro is not None:
            weights = ctx.gdro.sample_weights(group_ids)  # one id per sample: mean 1 over samples
            adv = adv * torch.tensor(weights, dtype=adv.dtype)
        samples = [
            TrainSample(r.prompt_token_ids, r.response_token_ids, r.logprobs, float(a), gid, loss_mask=m)
            for r, a, gid, m in zip(flat, adv.tolist(), group_ids, masks)
        ]
        by_group = split(list(rewards), [len(g) for g in groups])
        lengths = np.array([len(r.response_token_ids) for r in flat])
        stats.update({
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "reward/accuracy": float(np.mean([r.correct for r in results])),
            "rollout/num_samples": float(len(flat)),
            "rollout/samples_per_prompt_min": float(min(len(g) for g in groups)),
            "rollout/samples_per_prompt_max": float(max(len(g) for g in groups)),
            "rollout/response_len_mean": float(lengths.mean()),
            "rollout/response_len_max": float(lengths.max()),
            "rollout/truncated_frac": float(np.mean([r.finish_reason == "length" for r in flat])),
            "rollout/groups_all_equal_frac": float(np.mean([max(g) == min(g) for g in by_group])),
            "rollout/advantage_abs_mean": float(np.abs(adv.numpy()).mean()),
        })
        return samples, stats, raw_advantages

    @staticmethod
    def rows(ctx: RolloutContext, items, groups, results) -> list[dict]:
        flat = [(it, r) for it, g in zip(items, groups) for r in g][:ctx.cfg.run.log_samples_per_step]
        return [{"prompt_id": it.id, "prompt": it.prompt, "response": r.response_text, "answer": it.answer,
                 **result_fields(results[i]), "extracted": results[i].extracted,
                 "num_response_tokens": r.num_response_tokens, "finish_reason": r.finish_reason}
                for i, (it, r) in enumerate(flat)]

    # ------------------------------------------------------------------ held-out
    def evaluate(self, ctx: RolloutContext, step: int) -> dict[str, float]:
        """Held-out accuracy of the current policy (greedy by default), and ``eval.benchmarks`` with ``rl eval``'s
        statistics."""
        ec = ctx.cfg.eval
        n = ec.num_samples
        max_tokens = ec.max_response_tokens or ctx.cfg.rollout.max_response_tokens
        t0 = time.perf_counter()
        groups = ctx.generate(ctx.eval_items, n, step=-1 - step, temperature=ec.temperature, max_tokens=max_tokens)
        results = ctx.score(ctx.eval_items, groups)
        ctx.end_evaluation()
        correct = np.array([r.correct for r in results], dtype=float).reshape(len(ctx.eval_items), n)
        out = {
            "eval/accuracy": float(correct.mean()),
            "eval/num_problems": float(len(ctx.eval_items)),
            "eval/response_len_mean": float(np.mean([len(r.response_token_ids) for g in groups for r in g])),
            "perf/eval_s": time.perf_counter() - t0,
        }
        if n > 1:
            out[f"eval/pass@{n}"] = float(np.mean([pass_at_k(n, int(c), n) for c in correct.sum(1)]))
        out.update(initially_unsolved_accuracy(Path(ctx.cfg.run.output_dir) / INITIAL_EVAL_FILE, step,
                                               [it.id for it in ctx.eval_items], correct))
        if ctx.benchmarks:
            from rl.eval_stats import evaluate_benchmarks

            bench = evaluate_benchmarks(
                lambda items, k: ctx.generate(items, k, step=-1 - step, temperature=ec.temperature,
                                              max_tokens=max_tokens),
                ctx.score, ctx.benchmarks, n,
            )
            ctx.end_evaluation()
            out["perf/eval_s"] += bench.pop("perf/eval_s")
            out.update(bench)
        return out
