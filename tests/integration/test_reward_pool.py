"""The reward pool where math-verify's signal-based timeout breaks: a non-main thread and a real Ray actor.

Both run the full path: start-up smoke calls, grading, a pathological input killed at the deadline, and
grading again afterwards.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from rewards import RewardPool, RewardRequest, RewardSpec

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1.0
HANG = "\\boxed{10^{10^{10}}}"  # sympy works on this for minutes


def _requests() -> list[RewardRequest]:
    return [
        RewardRequest("1+1?", "<think>hmm</think> so \\boxed{2}", "2"),
        RewardRequest("half?", "the answer is 0.5", "\\frac{1}{2}"),
        RewardRequest("1+1?", "so \\boxed{3}", "2"),
        RewardRequest("hang", HANG, "5"),
        RewardRequest("after", "\\fbox{7}", "7"),
    ]


def _check(results, elapsed: float) -> None:
    assert [r.correct for r in results] == [True, True, False, False, True]
    assert [r.status for r in results] == ["ok", "ok", "ok", "timeout", "ok"]
    assert elapsed < TIMEOUT_S + 3.0


def test_math_verify_own_timeout_fails_off_the_main_thread() -> None:
    """The bug this package exists for: math-verify's default (signal) timeout cannot run in a thread."""
    import math_verify

    outcome = {}

    def grade() -> None:
        try:
            outcome["value"] = math_verify.verify(math_verify.parse("$2$"), math_verify.parse("$2$"))
        except ValueError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join(timeout=60)
    assert "error" in outcome or outcome.get("value") is False, outcome


def test_pool_created_and_used_in_a_non_main_thread() -> None:
    outcome: dict = {}

    def run() -> None:
        with RewardPool([RewardSpec("math_verify"), RewardSpec("format_boxed", weight=0.1)],
                        num_workers=2, timeout_s=TIMEOUT_S) as pool:
            start = time.monotonic()
            outcome["results"] = pool.score(_requests())
            outcome["elapsed"] = time.monotonic() - start
            outcome["metrics"] = pool.metrics()

    thread = threading.Thread(target=run, name="reward-scoring-thread")
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    _check(outcome["results"], outcome["elapsed"])
    assert outcome["metrics"]["reward/math_verify/timeout_rate"] == pytest.approx(1 / 5)
    assert outcome["metrics"]["reward/worker_restarts"] == 1


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
    results, elapsed, on_main_thread, metrics = ray.get(grader.score.remote(_requests()), timeout=120)
    _check(results, elapsed)
    assert not on_main_thread
    assert metrics["reward/math_verify/timeout_rate"] == pytest.approx(1 / 5)
    # Warm workers keep serving many requests after the replacement.
    many = [RewardRequest("", f"\\boxed{{{i}}}", str(i)) for i in range(50)]
    results, _, _, _ = ray.get(grader.score.remote(many), timeout=120)
    assert all(r.correct for r in results)
    ray.get(grader.close.remote(), timeout=60)


def test_pool_with_spawn_start_method() -> None:
    """The slower, fully independent start method also grades and replaces a killed worker."""
    with RewardPool([RewardSpec("math_verify")], num_workers=2, timeout_s=TIMEOUT_S, start_method="spawn",
                    startup_timeout_s=180.0) as pool:
        start = time.monotonic()
        results = pool.score(_requests())
        _check(results, time.monotonic() - start)


def test_workers_do_not_rerun_the_main_script(tmp_path) -> None:
    """A driver script without a __main__ guard (or one importing torch at the top) must not be re-run in
    every worker: it would start pools recursively and load the driver into each worker."""
    import subprocess
    import sys

    script = tmp_path / "driver_without_guard.py"
    script.write_text(
        "print('MAIN RAN', flush=True)\n"
        "from rewards import RewardPool, RewardRequest, RewardSpec\n"
        "for method in ('forkserver', 'spawn'):\n"
        "    with RewardPool([RewardSpec('math_verify')], num_workers=2, start_method=method, timeout_s=1.0) as p:\n"
        "        r = p.score([RewardRequest('', '\\\\boxed{2}', '2'), RewardRequest('', '\\\\boxed{10^{10^{10}}}', '2')])\n"
        "        print(method, [x.status for x in r], flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("MAIN RAN") == 1
    assert "forkserver ['ok', 'timeout']" in out.stdout and "spawn ['ok', 'timeout']" in out.stdout
