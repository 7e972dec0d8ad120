"""Where a step's batch comes from: made when the step asks for it (``BatchSource``) or, in async mode, made during
the previous step's update (``AsyncBatchSource``, ``async_mode``).

Making a batch: the sampler's position is marked (a checkpoint taken while the next batch is already drawn saves the
position before its draws), the step hooks see it start and end, the rollout kind collects it, the reward pool's
counters join its metrics, and it is stamped with the policy version the engines served.
"""

from __future__ import annotations

import time

from trainers.kinds.base import RolloutContext, RolloutKind, StepBatch


class BatchSource:
    def __init__(self, kind: RolloutKind, ctx: RolloutContext, hooks: list, sync) -> None:
        self.kind = kind
        self.ctx = ctx
        self.hooks = hooks
        self.sync = sync
        # the sampler's state just before each step's prompts were drawn, for the steps a checkpoint may still need
        self.marks: dict[int, dict] = {}

    def collect(self, step: int) -> StepBatch:
        self.marks = {s: v for s, v in self.marks.items() if s >= step - 1}
        self.marks[step] = self.ctx.sampler.state_dict()
        for hook in self.hooks:
            hook.before_collect(step)
        batch = self.kind.collect(self.ctx, step)
        # the pool's own counters (timeouts, parse failures...) never overwrite the batch's metrics
        batch.metrics = {**self.ctx.reward_pool.metrics(reset=True), **batch.metrics}
        for hook in self.hooks:
            hook.after_collect(step, batch)
        batch.engine_version = self.sync.version
        return batch

    def take(self, step: int) -> StepBatch:
        """Step ``step``'s batch."""
        return self.collect(step)

    def overlap(self, step: int, metrics: dict[str, float]) -> None:
        """Called while the learner trains on step ``step``'s batch."""

    def sync_due(self, step: int, eval_due: bool) -> bool:
        """Whether the engines get step ``step``'s weights now."""
        return True

    def finish(self, step: int, batch: StepBatch, metrics: dict[str, float]) -> None:
        metrics["async/policy_lag"] = float(step - 1 - batch.engine_version)

    def sampler_state(self, step: int) -> dict:
        """The sampler position a checkpoint of step ``step`` resumes from: before step ``step + 1``'s draws."""
        return self.marks.get(step + 1) or self.ctx.sampler.state_dict()


class AsyncBatchSource(BatchSource):
    """Step ``step + 1``'s batch is generated while the learner trains on step ``step``'s, if its policy lag (the
    learner's version it trains on minus the engines' version that generates it) stays within ``max_lag``; the sync
    after a step is skipped while the next batch's lag allows (never before an evaluation)."""

    def __init__(self, kind: RolloutKind, ctx: RolloutContext, hooks: list, sync, num_steps: int,
                 max_lag: int) -> None:
        super().__init__(kind, ctx, hooks, sync)
        self.num_steps = num_steps
        self.max_lag = max_lag
        self.pending: dict[int, StepBatch] = {}

    def take(self, step: int) -> StepBatch:
        batch = self.pending.pop(step, None)
        return batch if batch is not None else self.collect(step)

    def overlap(self, step: int, metrics: dict[str, float]) -> None:
        metrics["async/overlap_generate_s"] = 0.0
        if step < self.num_steps and step - self.sync.version <= self.max_lag:
            t0 = time.perf_counter()
            self.pending[step + 1] = self.collect(step + 1)
            metrics["async/overlap_generate_s"] = time.perf_counter() - t0

    def sync_due(self, step: int, eval_due: bool) -> bool:
        return self.sync.version < step + 1 - self.max_lag or eval_due
