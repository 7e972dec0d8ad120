"""The learner's turn on colocated placement (``placement.mode=colocated``): the engines sleep while the learner
trains on the devices they share.

vLLM keeps a sleeping engine's scheduler paused until every tag is awake, so the order is: sleep, the update,
weights awake, the push, KV cache awake, and only then anything that generates (the canary).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


def engines_call(engines: list, method: str, *args) -> float:
    """``method`` on every engine; the slowest one's answer (seconds)."""
    import ray

    return float(max(ray.get([getattr(e, method).remote(*args) for e in engines]), default=0.0))


class LearnerTurn:
    def __init__(self, engines: list, colocated: bool, sleep_level: int) -> None:
        self.engines = engines
        self.colocated = colocated
        self.sleep_level = sleep_level

    @contextmanager
    def __call__(self, metrics: dict[str, float]) -> Iterator[Callable[[], None]]:
        """Around the update and the push; yields ``wake_weights``, to call before the push."""
        if not self.colocated:
            yield lambda: None
            return
        metrics["perf/engine_sleep_s"] = engines_call(self.engines, "sleep", self.sleep_level)

        def wake_weights() -> None:
            metrics["perf/engine_wake_s"] = engines_call(self.engines, "wake_up", ["weights"])

        yield wake_weights
        metrics["perf/engine_wake_s"] += engines_call(self.engines, "wake_up", ["kv_cache"])
