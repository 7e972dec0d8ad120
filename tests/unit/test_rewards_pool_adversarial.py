"""Adversarial responses through the pool: each returns within timeout + 1 s as a counted failure, and the
pool keeps serving afterwards. Several of these hang math-verify/sympy for minutes (or exhaust memory) when
called directly; here the parent kills the worker at the deadline."""

from __future__ import annotations

import time

import pytest

from rewards import RewardPool, RewardRequest, RewardSpec

TIMEOUT_S = 1.0

ADVERSARIAL = {
    "1mb-junk": "x" * 1_000_000,
    "1mb-latex-noise": "$\\frac{1}{" * 110_000,
    "10k-nested-braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "300-nested-parens": "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
    "unclosed-boxed": "The answer is \\boxed{" + "1+" * 1_000,
    "huge-exponent": "\\boxed{10^{10^{10}}}",
    "factorial-tower": "\\boxed{((9!)!)!}",
    "power-tower": "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "null-bytes": "\x00" * 100_000,
    "invalid-utf8-surrogates": "\udcff\udcfe" * 1_000 + "\\boxed{\udc80}",
    "sympy-huge-polynomial": "\\boxed{(x+1)^{100000}}",
    "sympy-integral": "\\boxed{\\int_0^\\infty e^{-x^{1000}}dx}",
    "sympy-huge-sum": "\\boxed{\\sum_{n=1}^{10^{9}} n^{n}}",
}


@pytest.fixture(scope="module")
def pool():
    with RewardPool([RewardSpec("math_verify")], num_workers=2, timeout_s=TIMEOUT_S) as pool:
        pool.metrics(reset=True)
        yield pool


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_input_is_bounded_and_counted(pool: RewardPool, name: str) -> None:
    pool.metrics(reset=True)
    start = time.monotonic()
    (result,) = pool.score([RewardRequest(prompt="", response=ADVERSARIAL[name], answer="5")])
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + 1.0, f"{name} took {elapsed:.2f}s"
    assert result.status in ("timeout", "parse_fail", "error"), result
    assert (result.score, result.correct) == (0.0, False)
    metrics = pool.metrics()
    counted = sum(metrics[f"reward/math_verify/{kind}_rate"] for kind in ("timeout", "parse_fail", "error"))
    assert counted == 1.0
    # The pool keeps serving, at once.
    start = time.monotonic()
    (after,) = pool.score([RewardRequest(prompt="", response="so \\boxed{5}", answer="5")])
    assert after.correct and time.monotonic() - start < TIMEOUT_S + 1.0


def test_a_batch_mixing_hangs_and_normal_rows(pool: RewardPool) -> None:
    hangs = [ADVERSARIAL["huge-exponent"], ADVERSARIAL["factorial-tower"], ADVERSARIAL["sympy-integral"]]
    requests = [RewardRequest("", response, "5") for response in hangs]
    requests += [RewardRequest("", f"\\boxed{{{i}}}", str(i)) for i in range(20)]
    start = time.monotonic()
    results = pool.score(requests)
    # 3 hangs on 2 workers: at most two rounds of the timeout plus normal grading.
    assert time.monotonic() - start < 2 * TIMEOUT_S + 3.0
    assert [r.status for r in results[:3]] == ["timeout"] * 3
    assert all(r.correct for r in results[3:])


def test_valid_answer_survives_noise(pool: RewardPool) -> None:
    noisy = "\x00" + "y" * 1_000_000 + "\udcff so the answer is \\boxed{5}"
    (result,) = pool.score([RewardRequest("", noisy, "5")])
    assert result.correct and result.status == "ok"
