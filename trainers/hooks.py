"""Step hooks: what a feature adds to every step without the loop naming it.

The loop (``trainers.driver``) calls each hook at fixed points of a step; a hook keeps whatever it carries from one
point to the next in its own fields. Checkpoints hold each hook's ``state_dict`` under its ``name``.

    before_collect / after_collect   around the making of each batch (the next step's too, in async mode)
    after_update                     the learner's update is done (its metrics are in)
    after_push                       the engines hold the new weights (before the canary)
    after_step                       the step's metrics are complete

Hooks: Prompt/Rollout-GDRO (``GdroHook``, below) and the online drafter (``trainers.spec_decode``).
"""

from __future__ import annotations

from trainers.kinds.base import StepBatch


class StepHook:
    """Every point a no-op; a hook overrides the ones it needs."""

    name = ""

    def start_metrics(self) -> dict[str, float]:
        """Metrics for step 0's log line."""
        return {}

    def before_collect(self, step: int) -> None:
        pass

    def after_collect(self, step: int, batch: StepBatch) -> None:
        pass

    def after_update(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def after_push(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def after_step(self, step: int, batch: StepBatch, metrics: dict[str, float]) -> None:
        pass

    def state_dict(self) -> dict | None:
        """What a checkpoint keeps of this hook (None: nothing)."""
        return None

    def load_state_dict(self, state: dict | None, checkpoint: str) -> None:
        """``state``: what the checkpoint ``checkpoint`` kept (None when it kept nothing for this hook)."""


class GdroHook(StepHook):
    """Prompt- and Rollout-GDRO (``rl.algorithms.gdro``): the controller the single-turn kind asks for per-prompt
    sample counts and sample weights learns, after each update, from the batch's graded groups and unweighted
    advantages (``batch.feedback["gdro"]``)."""

    name = "gdro"

    def __init__(self, controller) -> None:
        self.controller = controller

    def after_step(self, step: int, batch: StepBatch, metrics: dict[str, float]) -> None:
        feed = batch.feedback.get("gdro")
        if feed is None:
            return
        seen, raw_advantages, decisions = feed
        self.controller.update([pid for pid, _ in seen], [c for _, c in seen],
                               advantages=[raw_advantages.get(pid, [0.0] * len(c)) for pid, c in seen])
        metrics.update({**self.controller.state_metrics(), **decisions})

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict | None, checkpoint: str) -> None:
        if state is None:
            raise ValueError(f"{checkpoint} has no GDRO controller state, but gdro is enabled in this config")
        self.controller.load_state_dict(state)
