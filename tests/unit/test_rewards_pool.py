"""RewardPool: combining rewards, metrics, plug-in failures, audit, start-up errors.

Pools are started once per module (start-up forks warm workers from the forkserver in ~0.2 s).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from rewards import RewardPool, RewardRequest, RewardSpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reward_plugins.py"
HANG_ON_IMPORT = FIXTURES.parent / "reward_plugin_hangs_on_import.py"
PLUGIN_TIMEOUT_S = 1.0


def plugin(name: str, **kwargs) -> RewardSpec:
    return RewardSpec(f"{FIXTURES}:{name}", **kwargs)


@pytest.fixture(scope="module")
def pool():
    specs = [
        RewardSpec("math_verify"),
        RewardSpec("format_boxed", weight=0.5),
        RewardSpec("length_penalty", kwargs={"max_length": 200, "buffer_length": 100}),
    ]
    with RewardPool(specs, num_workers=2, timeout_s=10.0) as pool:
        yield pool


@pytest.fixture(scope="module")
def audit_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit") / "disagreements.jsonl"


@pytest.fixture(scope="module")
def plugin_pool(audit_log):
    specs = [
        plugin("always_wrong"),
        plugin("says_yes", weight=2.0),
        plugin("async_half", kwargs={"value": 0.25}),
        plugin("picky"),
        plugin("hangs"),
        plugin("crashes"),
        plugin("hogs_memory"),
    ]
    with RewardPool(specs, num_workers=2, timeout_s=PLUGIN_TIMEOUT_S, audit_fraction=1.0,
                    audit_log_path=str(audit_log), memory_limit_mb=2048) as pool:
        yield pool


def req(response: str, answer: str = "5") -> RewardRequest:
    return RewardRequest(prompt="What is 2 + 3?", response=response, answer=answer)


def test_combined_score_and_components(pool: RewardPool) -> None:
    long_response = "x" * 150 + " \\boxed{5}"
    right, wrong, unboxed, long_right = pool.score(
        [req("so \\boxed{5}"), req("so \\boxed{6}"), req("the answer is 5"), req(long_response)]
    )
    assert right.components == {"math_verify": 1.0, "format_boxed": 1.0, "length_penalty": 0.0}
    assert (right.score, right.correct, right.extracted, right.status) == (1.5, True, "5", "ok")
    assert (wrong.score, wrong.correct) == (0.5, False)  # score > 0 but the verifier says wrong
    assert (unboxed.score, unboxed.correct) == (1.0, True)
    assert long_right.components["length_penalty"] == pytest.approx(-(len(long_response) - 100) / 100)
    assert long_right.correct


def test_batch_keeps_order(pool: RewardPool) -> None:
    requests = [req(f"\\boxed{{{i}}}", answer=str(i if i % 3 else i + 1)) for i in range(40)]
    results = pool.score(requests)
    assert [r.correct for r in results] == [bool(i % 3) for i in range(40)]
    assert [r.extracted for r in results] == [str(i) for i in range(40)]
    assert pool.score([]) == []


def test_metrics_count_failures_and_reset(pool: RewardPool) -> None:
    pool.metrics(reset=True)
    pool.score([req("no answer at all"), req("\\boxed{5}")])
    metrics = pool.metrics(reset=False)
    assert metrics["reward/math_verify/parse_fail_rate"] == 0.5
    assert metrics["reward/math_verify/timeout_rate"] == 0.0
    assert metrics["reward/math_verify/error_rate"] == 0.0
    assert metrics["reward/num_graded"] == 2 and metrics["reward/accuracy"] == 0.5
    assert metrics["reward/math_verify/mean_time_s"] > 0
    assert "reward/format_boxed/error_rate" in metrics and "reward/length_penalty/timeout_rate" in metrics
    assert pool.metrics()["reward/num_graded"] == 2
    assert pool.metrics()["reward/num_graded"] == 0


def test_score_from_several_threads(pool: RewardPool) -> None:
    results: dict[int, list] = {}

    def run(i: int) -> None:
        results[i] = pool.score([req(f"\\boxed{{{i}}}", answer=str(i))])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(results[i][0].correct for i in range(4))


def test_rejects_non_requests(pool: RewardPool) -> None:
    with pytest.raises(ValueError, match="RewardRequest"):
        pool.score([("prompt", "response", "answer")])


def test_plugin_pool_names_and_verifier(plugin_pool: RewardPool) -> None:
    assert plugin_pool.names == ["always_wrong", "says_yes", "async_half", "picky", "hangs", "crashes", "hogs_memory"]
    (result,) = plugin_pool.score([req("yes, \\boxed{7}", answer="7")])
    assert result.correct is False  # from the verifier plug-in, although the combined score is > 0
    assert result.components["says_yes"] == 1.0 and result.components["async_half"] == 0.25
    assert result.score == pytest.approx(2.0 + 0.25 + 1.0)


@pytest.mark.parametrize(
    ("trigger", "component", "status", "message"),
    [
        ("boom", "picky", "error", "picky: RuntimeError: picky exploded"),
        ("nan", "picky", "error", "non-finite"),
        ("string", "picky", "error", "return a float"),
        ("crash", "crashes", "error", "crashed (exit code 3)"),
        ("hog", "hogs_memory", "error", "MemoryError"),
        ("hang", "hangs", "timeout", "exceeded"),
    ],
)
def test_plugin_failures_fail_closed_and_are_counted(plugin_pool, trigger, component, status, message) -> None:
    plugin_pool.metrics(reset=True)
    start = time.monotonic()
    (result,) = plugin_pool.score([req(trigger)])
    assert time.monotonic() - start < PLUGIN_TIMEOUT_S + 1.0
    assert result.components[component] == 0.0
    assert result.status == status and message in result.error
    metrics = plugin_pool.metrics()
    assert metrics[f"reward/{component}/{status}_rate"] == 1.0
    # ...and the pool keeps serving.
    (after,) = plugin_pool.score([req("fine")])
    assert after.status == "ok"


def test_audit_catches_a_broken_verifier(plugin_pool, audit_log) -> None:
    plugin_pool.metrics(reset=True)
    plugin_pool.score([req("so \\boxed{5}", answer="5"), req("so \\boxed{6}", answer="5")])
    metrics = plugin_pool.metrics()
    assert metrics["reward/always_wrong/audited"] == 2
    assert metrics["reward/always_wrong/audit_disagreements"] == 1
    assert metrics["reward/audit_disagreements"] == 1
    rows = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert rows[-1]["response"] == "so \\boxed{5}" and rows[-1]["gold"] == "5"
    assert rows[-1]["audit"]["method"] == "string"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (plugin("broken_at_smoke"), r"reward spec '.*broken_at_smoke' failed at start-up: smoke call failed \(error\)"),
        (plugin("wrong_signature"), r"wrong_signature\(text\) cannot be called"),
        (RewardSpec("no_such_pkg_xyz.mod:fn"), r"'no_such_pkg_xyz.mod:fn'.*cannot import"),
        (RewardSpec(f"{FIXTURES}:missing"), r"has no attribute 'missing'"),
    ],
)
def test_broken_plugins_fail_at_start_up(spec: RewardSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardPool([RewardSpec("format_boxed"), spec], num_workers=1)


def test_plugin_hanging_on_import_times_out_at_start_up() -> None:
    spec = RewardSpec(f"{HANG_ON_IMPORT}:never_reached")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"reward_plugin_hangs_on_import.py:never_reached' did not finish loading"):
        RewardPool([spec], num_workers=1, startup_timeout_s=1.0)
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(specs=[]), "at least one RewardSpec"),
        (dict(specs=[RewardSpec("nope")]), r"unknown reward 'nope'; valid registered names are \["),
        (dict(specs=[RewardSpec("math_verify")], num_workers=0), "num_workers"),
        (dict(specs=[RewardSpec("math_verify")], timeout_s=0), "timeout_s"),
        (dict(specs=[RewardSpec("math_verify")], audit_fraction=2.0), "audit_fraction"),
        (dict(specs=[RewardSpec("math_verify")], start_method="fork"), "start_method"),
        (dict(specs=[RewardSpec("math_verify", kwargs={"strictt": True})]), "unknown option"),
    ],
)
def test_bad_pool_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardPool(**kwargs)


def test_closed_pool_refuses_work() -> None:
    pool = RewardPool([RewardSpec("format_boxed")], num_workers=1)
    pool.close()
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.score([req("x")])


def test_unpicklable_metadata_fails_only_that_request(pool: RewardPool) -> None:
    bad = RewardRequest("", "\\boxed{5}", "5", metadata={"fn": lambda: None})
    good = req("\\boxed{5}")
    results = pool.score([good, bad, good])
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert "must be picklable" in results[1].error
    assert pool.score([good])[0].correct


def test_every_failing_component_is_named_and_first_errors_are_kept(plugin_pool: RewardPool) -> None:
    plugin_pool.take_first_errors()
    plugin_pool.metrics(reset=True)
    boom, both = plugin_pool.score([req("boom"), req("crash boom")])
    assert boom.status == "error" and boom.error == "picky: RuntimeError: picky exploded"
    picky_error, crash_error = both.error.split("; ")
    assert picky_error == "picky: RuntimeError: picky exploded"
    assert crash_error.startswith("crashes: the reward worker crashed (exit code 3)")
    metrics = plugin_pool.metrics()
    assert (metrics["reward/picky/num_errors"], metrics["reward/crashes/num_errors"]) == (2.0, 1.0)
    assert metrics["reward/says_yes/num_errors"] == 0.0
    first = plugin_pool.take_first_errors()
    assert sorted(first) == ["crashes", "picky"] and first["picky"] == "RuntimeError: picky exploded"
    assert plugin_pool.take_first_errors() == {}
