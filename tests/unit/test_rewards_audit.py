"""The audit's independent checks (loose normalization, restricted numeric parser) and its log."""

from __future__ import annotations

import json
import math

import pytest

from rl.types import RewardResult
from rewards.audit import Auditor, loose_normalize, safe_numeric_value, second_opinion
from rewards.base import RewardRequest


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1/2", 0.5), ("\\frac{1}{2}", 0.5), ("\\dfrac12", 0.5), ("-3", -3.0), ("2^{10}", 1024.0),
        ("2\\sqrt{2}", 2 * math.sqrt(2)), ("\\sqrt[3]{27}", 3.0), ("3\\pi", 3 * math.pi), ("50%", 0.5),
        ("1,234.5", 1234.5), ("(1+2)\\cdot3", 9.0), ("\\left(2\\right)^{-1}", 0.5), ("1.5\\times10^{3}", 1500.0),
        ("-2^2", -4.0), ("2^3^2", 512.0),
    ],
)
def test_safe_numeric_value(text: str, value: float) -> None:
    assert safe_numeric_value(text) == pytest.approx(value)


@pytest.mark.parametrize(
    "text",
    [
        "x+1", "\\sin(1)", "__import__('os').system('echo hi')", "1/0", "10^{10^{10}}", "2^{9999}",
        "(" * 200 + "1" + ")" * 200, "", "1+", "(-8)^{1/3}", "\\sqrt{-1}", "9!", "1" * 400,
    ],
)
def test_safe_numeric_value_refuses(text: str) -> None:
    assert safe_numeric_value(text) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [("\\text{ Devon }", "devon"), ("27.0", "27"), ("025", "25"), ("x = 5", "5"), ("30^\\circ", "30"),
     ("\\left( 1, 2 \\right)", "(1,2)"), ("1{,}000", "1000"), ("$\\dfrac{1}{2}$", "\\frac{1}{2}")],
)
def test_loose_normalize_equates(a: str, b: str) -> None:
    assert loose_normalize(a) == loose_normalize(b)


def test_second_opinion_methods() -> None:
    assert second_opinion("", "27.0", "27").method == "string"
    assert second_opinion("", "\\frac{1}{2}", "0.5").method == "numeric"
    assert not second_opinion("", "0.51", "0.5").equivalent
    # Without an extracted answer it finds its own (last boxed, else last number).
    assert second_opinion("so \\boxed{\\frac{1}{2}}", None, "0.5").equivalent
    assert second_opinion("it is 41 or 42", None, "42").equivalent
    assert second_opinion("no digits", None, "42").method == "none"


def test_auditor_samples_only_incorrect_ok_or_parse_fail() -> None:
    auditor = Auditor(1.0, None, seed=0)
    assert auditor.should_audit(RewardResult(0.0, False))
    assert auditor.should_audit(RewardResult(0.0, False, status="parse_fail"))
    assert not auditor.should_audit(RewardResult(1.0, True))
    assert not auditor.should_audit(RewardResult(0.0, False, status="timeout"))
    assert not Auditor(0.0, None, seed=0).should_audit(RewardResult(0.0, False))


def test_auditor_fraction_is_seeded() -> None:
    def draws(seed: int) -> list[bool]:
        auditor = Auditor(0.3, None, seed=seed)
        return [auditor.should_audit(RewardResult(0.0, False)) for _ in range(500)]

    first = draws(7)
    assert draws(7) == first  # the whole sequence repeats under one seed
    assert draws(8) != first  # and another seed draws another one
    assert 120 <= sum(first) <= 180  # 0.3 * 500 = 150, sd 10
    auditor = Auditor(0.3, None, seed=1)
    hits = sum(auditor.should_audit(RewardResult(0.0, False)) for _ in range(2000))
    assert 500 < hits < 700


def test_auditor_logs_disagreements(tmp_path) -> None:
    log = tmp_path / "sub" / "audit.jsonl"
    auditor = Auditor(1.0, str(log), seed=0)
    request = RewardRequest("prompt", "so \\boxed{0.5}", "\\frac{1}{2}")
    assert auditor.audit("math_verify", request, RewardResult(0.0, False, extracted="0.5"))
    assert not auditor.audit("math_verify", request, RewardResult(0.0, False, extracted="0.7"))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["gold"] == "\\frac{1}{2}" and rows[0]["response"] == "so \\boxed{0.5}"
    assert rows[0]["audit"] == {"method": "numeric", "candidate": "0.5"} and rows[0]["reward"] == "math_verify"


def test_auditor_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match=r"audit_fraction must be in \[0, 1\]"):
        Auditor(1.5, None, seed=0)
