"""The single-turn kind's batching (dynamic sampling, overlong shaping, truncation masks) in a fake context.

A unit test of the kind's bookkeeping only: the context's generation and grading are deterministic functions so the
expected numbers can be computed by hand. The real engine path is in tests/integration.
"""

from __future__ import annotations

import pytest

from rl.config import load_config
from rl.data.datasets import PromptSampler
from rl.types import PromptItem, RewardResult, Rollout
from trainers.kinds.base import RolloutContext
from trainers.kinds.single_turn import SingleTurn


class FakeContext(RolloutContext):
    """Generation and grading from fixed tables: prompt id -> correctness (and lengths) per sample."""

    def __init__(self, cfg, outcomes: dict[str, list[bool]], lengths: dict[str, list[int]] | None) -> None:
        items = [PromptItem(pid, f"prompt {pid}", "1") for pid in outcomes]
        sampler = PromptSampler(items, seed=0)
        sampler._order = list(range(len(items)))  # walk the prompts in the order given
        super().__init__(cfg, engines=[], reward_pool=None, sampler=sampler)
        self.outcomes, self.lengths = outcomes, lengths or {}
        self.calls: list[tuple[list[str], int, int]] = []

    def generate(self, items, n, step, temperature, max_tokens, seed_offset=0):
        self.calls.append(([it.id for it in items], n, seed_offset))
        out = []
        for it in items:
            lens = self.lengths.get(it.id) or [5] * len(self.outcomes[it.id])
            out.append([Rollout(it.id, [1, 2], [3] * ln, [-0.5] * ln, "length" if ln >= max_tokens else "stop", 0)
                        for ln in lens])
        return out

    def score(self, items, groups):
        return [RewardResult(score=float(c), correct=c) for it in items for c in self.outcomes[it.id]]


class KindInContext:
    """The single-turn kind and its fake context, with the kind's steps bound to the context."""

    def __init__(self, ctx: FakeContext) -> None:
        self.ctx, self.kind = ctx, SingleTurn(ctx.cfg)

    def rollout_batch(self, step: int):
        items, groups, results, stats, _ = self.kind.rollout(self.ctx, step)
        return items, groups, results, stats

    def build_samples(self, items, groups, results):
        samples, stats, _ = self.kind.build_samples(self.ctx, items, groups, results)
        return samples, stats


def make_trainer(tmp_path, outcomes: dict[str, list[bool]], lengths: dict[str, list[int]] | None = None, **over):
    overrides = [f"run.output_dir={tmp_path}", "rollout.max_response_tokens=20", "rollout.max_model_len=64"]
    overrides += [f"{k}={v}" for k, v in over.items()]
    ctx = FakeContext(load_config(None, overrides), outcomes, lengths)
    return KindInContext(ctx), ctx.calls


OUTCOMES = {  # 2 of every 3 prompts have all-equal groups
    "a": [True, True], "b": [False, False], "c": [True, False],
    "d": [True, True], "e": [False, True], "f": [False, False],
    "g": [True, True], "h": [True, False], "i": [False, False],
}


def test_without_dynamic_sampling_one_round_keeps_everything(tmp_path):
    trainer, calls = make_trainer(tmp_path, OUTCOMES, **{"rollout.prompts_per_step": 4,
                                                          "rollout.num_samples_per_prompt": 2})
    items, groups, results, stats = trainer.rollout_batch(step=1)
    assert [it.id for it in items] == ["a", "b", "c", "d"]
    assert len(calls) == 1 and len(results) == 8
    assert "dapo/gen_rounds" not in stats


def test_dynamic_sampling_fills_the_batch_and_counts_rounds(tmp_path):
    # 3 prompts per round, 1 valid per round, 2 wanted -> 2 rounds, exactly 2 groups (docs/algorithms.md "DAPO").
    trainer, calls = make_trainer(
        tmp_path, OUTCOMES,
        **{"rollout.prompts_per_step": 2, "rollout.num_samples_per_prompt": 2,
           "rollout.dynamic_sampling.enabled": "true", "rollout.dynamic_sampling.prompts_per_round": 3},
    )
    items, groups, results, stats = trainer.rollout_batch(step=1)
    assert [it.id for it in items] == ["c", "e"]
    assert [c[2] for c in calls] == [0, 3]  # distinct seeds per round
    assert stats["dapo/gen_rounds"] == 2.0
    assert stats["dapo/filtered_group_frac"] == pytest.approx(4 / 6)
    assert stats["dapo/batch_fill_frac"] == 1.0
    assert [r.correct for r in results] == [True, False, False, True]


def test_dynamic_sampling_truncates_to_exactly_the_batch(tmp_path):
    mixed = {k: [True, False] for k in "abcdef"}
    trainer, _ = make_trainer(tmp_path, mixed, **{"rollout.prompts_per_step": 2, "rollout.num_samples_per_prompt": 2,
                                                  "rollout.dynamic_sampling.enabled": "true",
                                                  "rollout.dynamic_sampling.prompts_per_round": 5})
    items, _, results, stats = trainer.rollout_batch(step=1)
    assert len(items) == 2 and len(results) == 4 and stats["dapo/gen_rounds"] == 1.0


def test_dynamic_sampling_cap_trains_on_a_partial_batch(tmp_path):
    trainer, calls = make_trainer(
        tmp_path, OUTCOMES,
        **{"rollout.prompts_per_step": 4, "rollout.num_samples_per_prompt": 2,
           "rollout.dynamic_sampling.enabled": "true", "rollout.dynamic_sampling.prompts_per_round": 3,
           "rollout.dynamic_sampling.max_rounds": 2},
    )
    items, _, _, stats = trainer.rollout_batch(step=1)
    assert len(calls) == 2 and [it.id for it in items] == ["c", "e"]
    assert stats["dapo/batch_fill_frac"] == 0.5


def test_overlong_penalty_shapes_scores_and_truncated_tokens_get_no_loss(tmp_path):
    # max_response_tokens=20, buffer 8: lengths 12 -> 0, 16 -> -0.5, 20 (truncated) -> -1.
    trainer, _ = make_trainer(
        tmp_path, {"a": [True, True, False]}, lengths={"a": [12, 16, 20]},
        **{"rollout.prompts_per_step": 1, "rollout.num_samples_per_prompt": 3,
           "shaping.overlong_buffer_len": 8, "shaping.mask_truncated": "true"},
    )
    items, groups, results, stats = trainer.rollout_batch(step=1)
    assert [r.score for r in results] == pytest.approx([1.0, 0.5, -1.0])
    assert [r.correct for r in results] == [True, True, False]  # the verdict is not shaped
    assert stats["shaping/overlong_frac"] == pytest.approx(2 / 3)
    samples, _ = trainer.build_samples(items, groups, results)
    assert [s.loss_mask for s in samples] == [None, None, [0] * 20]


def test_overlong_buffer_longer_than_the_budget_is_rejected():
    with pytest.raises(Exception, match="overlong_buffer_len"):
        load_config(None, ["rollout.max_response_tokens=20", "shaping.overlong_buffer_len=30"])
