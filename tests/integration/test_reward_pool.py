"""The reward pool inside a real Ray actor, where math-verify's signal-based timeout breaks (Ray runs the methods
of an actor with max_concurrency > 1 off its main thread): grading, a pathological input killed at the deadline,
and grading again afterwards. The other places it breaks: tests/unit/test_rewards_pool_threads.py."""

from __future__ import annotations

import os
import threading
import time

import pytest

from rewards import RewardPool, RewardRequest, RewardSpec
from tests.unit.test_rewards_pool_threads import REPO_ROOT, TIMEOUT_S, check, requests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}},
    )
    yield ray
    ray.shutdown()


def test_pool_inside_a_ray_actor(ray_session) -> None:
    ray = ray_session

    # max_concurrency > 1 makes Ray run the methods on a thread pool, i.e. off the actor's main thread.
    @ray.remote(num_cpus=1, max_concurrency=2)
    class Grader:
        def __init__(self) -> None:
            self.pool = RewardPool([RewardSpec("math_verify")], num_workers=2, timeout_s=TIMEOUT_S)

        def score(self, requests):
            start = time.monotonic()
            results = self.pool.score(requests)
            on_main = threading.current_thread() is threading.main_thread()
            return results, time.monotonic() - start, on_main, self.pool.metrics()

        def close(self) -> None:
            self.pool.close()

    grader = Grader.remote()
    results, elapsed, on_main_thread, metrics = ray.get(grader.score.remote(requests()), timeout=120)
    check(results, elapsed)
    assert not on_main_thread
    assert metrics["reward/math_verify/timeout_rate"] == pytest.approx(1 / 5)
    # Warm workers keep serving many requests after the replacement.
    many = [RewardRequest("", f"\\boxed{{{i}}}", str(i)) for i in range(50)]
    results, _, _, _ = ray.get(grader.score.remote(many), timeout=120)
    assert all(r.correct for r in results)
    ray.get(grader.close.remote(), timeout=60)
