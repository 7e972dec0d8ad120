"""The reward pool where math-verify's signal-based timeout breaks: off the main thread, under the spawn start
method, and from a driver script without a ``__main__`` guard. Each runs the full path: start-up smoke calls,
grading, a pathological input killed at the deadline, and grading again afterwards. (Inside a Ray actor:
tests/integration/test_reward_pool.py.)"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from rewards import RewardPool, RewardRequest, RewardSpec

pytestmark = pytest.mark.slow  # worker processes and a 1 s grading deadline: seconds per test

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1.0
HANG = "\\boxed{10^{10^{10}}}"  # sympy works on this for minutes


def requests() -> list[RewardRequest]:
    return [
        RewardRequest("1+1?", "<think>hmm</think> so \\boxed{2}", "2"),
        RewardRequest("half?", "the answer is 0.5", "\\frac{1}{2}"),
        RewardRequest("1+1?", "so \\boxed{3}", "2"),
        RewardRequest("hang", HANG, "5"),
        RewardRequest("after", "\\fbox{7}", "7"),
    ]


def check(results, elapsed: float) -> None:
    assert [r.correct for r in results] == [True, True, False, False, True]
    assert [r.status for r in results] == ["ok", "ok", "ok", "timeout", "ok"]
    assert elapsed < TIMEOUT_S + 3.0


def test_grader_grades_off_the_main_thread_as_on_it() -> None:
    """math-verify's own timeout is ``signal.alarm``, which raises off the main thread (and a caller that
    swallows it scores 0); ``grade_math`` turns it off, so a thread grades exactly as the main thread does."""
    from rewards.math_verifier import grade_math

    cases = [(r.prompt, r.response, r.answer) for i, r in enumerate(requests()) if i != 3]
    on_main = [(g.correct, g.status, g.score) for g in (grade_math(*c) for c in cases)]
    assert [c for c, _, _ in on_main] == [True, True, False, True]
    outcome: dict = {}

    def grade() -> None:
        outcome["graded"] = [(g.correct, g.status, g.score) for g in (grade_math(*c) for c in cases)]

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join(timeout=60)
    assert outcome["graded"] == on_main


def test_pool_created_and_used_in_a_non_main_thread() -> None:
    outcome: dict = {}

    def run() -> None:
        with RewardPool([RewardSpec("math_verify"), RewardSpec("format_boxed", weight=0.1)],
                        num_workers=2, timeout_s=TIMEOUT_S) as pool:
            start = time.monotonic()
            outcome["results"] = pool.score(requests())
            outcome["elapsed"] = time.monotonic() - start
            outcome["metrics"] = pool.metrics()

    thread = threading.Thread(target=run, name="reward-scoring-thread")
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    check(outcome["results"], outcome["elapsed"])
    assert outcome["metrics"]["reward/math_verify/timeout_rate"] == pytest.approx(1 / 5)
    assert outcome["metrics"]["reward/worker_restarts"] == 1


def test_pool_with_spawn_start_method() -> None:
    """The slower, fully independent start method also grades and replaces a killed worker."""
    with RewardPool([RewardSpec("math_verify")], num_workers=2, timeout_s=TIMEOUT_S, start_method="spawn",
                    startup_timeout_s=180.0) as pool:
        start = time.monotonic()
        results = pool.score(requests())
        check(results, time.monotonic() - start)


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
