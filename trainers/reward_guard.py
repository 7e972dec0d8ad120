"""A reward that errors must never train as a silent 0: each failing reward is warned about (rate-limited, with its
first error text), and one that errors on at least ``reward_pool.max_error_rate`` of a step's responses stops the
run (``RewardError``)."""

from __future__ import annotations

from collections.abc import Callable

# A reward that keeps erroring below the stop threshold is warned about at most once per this many steps.
WARN_EVERY_STEPS = 10


class RewardError(ValueError):
    """A configured reward errored on at least ``reward_pool.max_error_rate`` of a step's responses: training on
    its fail-closed zeros would be a silent 0."""


class RewardErrorGuard:
    def __init__(self, reward_pool, max_error_rate: float) -> None:
        self.reward_pool = reward_pool
        self.max_error_rate = max_error_rate
        self.warned: dict[str, int] = {}  # reward name -> step of its last warning

    def check(self, step: int, metrics: dict[str, float], before_stop: Callable[[], None] = lambda: None) -> None:
        """Warn (at most once per reward every ``WARN_EVERY_STEPS`` steps) about each reward that errored on some of
        this step's responses, with its first error text; call ``before_stop`` (the step's samples are logged
        there) and raise ``RewardError`` when one errored on at least ``max_error_rate`` of them."""
        texts = self.reward_pool.take_first_errors()
        graded = int(metrics.get("reward/num_graded", 0))
        failing = []
        for name in self.reward_pool.names:
            errors = int(metrics.get(f"reward/{name}/num_errors", 0))
            if not errors:
                continue
            text = texts.get(name, "(no error text)")
            rate = metrics[f"reward/{name}/error_rate"]
            if rate >= self.max_error_rate:
                failing.append(f"reward {name!r} errored on {errors}/{graded} responses of step {step} "
                               f"(reward_pool.max_error_rate={self.max_error_rate:g}); first error: {text}")
            elif step - self.warned.get(name, -WARN_EVERY_STEPS) >= WARN_EVERY_STEPS:
                self.warned[name] = step
                print(f"[rl] warning: step {step}: reward {name!r} errored on {errors}/{graded} responses (scored 0); "
                      f"first error: {text} (next warning for it in >= {WARN_EVERY_STEPS} steps; every "
                      f"step's count is in reward/{name}/num_errors, the texts in samples.jsonl)", flush=True)
        if failing:
            before_stop()
            raise RewardError("; ".join(failing))
