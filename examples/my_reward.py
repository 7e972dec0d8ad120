"""Example reward plug-in for AIME-style integer answers.

Use it from a config or the command line by path:

    rewards:
      - name: examples/my_reward.py:integer_match
        weight: 1.0
        kwargs: {max_value: 999}
      - name: examples/my_reward.py:shows_work
        weight: 0.1

    rl verify --reward examples/my_reward.py:integer_match --response 'so \\boxed{042}' --answer 42
"""

from __future__ import annotations

import re

from rl.types import RewardResult
from rewards import extract_answer

_INTEGER_RE = re.compile(r"-?\d+")


def integer_match(prompt: str, response: str, answer: str, metadata: dict, *, max_value: int = 999) -> RewardResult:
    """1.0 when the final answer is the gold integer (leading zeros ignored); a verifier.

    Answers outside [0, max_value] or without an integer are parse failures (score 0, counted by the pool).
    """
    found = extract_answer(response).answer  # last \boxed{}, '####' or 'the answer is'
    match = _INTEGER_RE.fullmatch(found.strip()) if found else None
    if match is None:
        return RewardResult(score=0.0, correct=False, extracted=found, status="parse_fail",
                            error="final answer is not an integer")
    value = int(match.group())
    if not 0 <= value <= max_value:
        return RewardResult(score=0.0, correct=False, extracted=found, status="parse_fail",
                            error=f"{value} is outside [0, {max_value}]")
    if not _INTEGER_RE.fullmatch(answer.strip()):
        return RewardResult(score=0.0, correct=False, extracted=found, status="error",
                            error=f"gold answer {answer!r} is not an integer; use math_verify for this data")
    correct = value == int(answer)
    return RewardResult(score=1.0 if correct else 0.0, correct=correct, extracted=found)


# Declares the capability: the pool takes `correct` from this reward and audits its "incorrect" verdicts.
integer_match.is_verifier = True


async def shows_work(prompt: str, response: str, answer: str, metadata: dict) -> float:
    """0..1: fraction of the first three lines of reasoning present (an async reward returning a float)."""
    lines = [line for line in response.splitlines() if line.strip()]
    return min(len(lines) - 1, 3) / 3 if lines else 0.0
