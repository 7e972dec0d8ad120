"""RewardSpec validation, wrapping of plain returns, and in-process calls of sync/async rewards."""

from __future__ import annotations

import math

import pytest

from rl.types import RewardResult
from rewards.base import (
    SMOKE_REQUEST,
    RewardEntry,
    RewardRequest,
    RewardSpec,
    call_reward,
    register_reward,
    to_reward_result,
)

REQUEST = RewardRequest(prompt="p", response="r", answer="a", metadata={"k": 1})


@pytest.mark.parametrize("bad", [dict(name=""), dict(name="  "), dict(name=3)])
def test_spec_rejects_bad_names(bad) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        RewardSpec(**bad)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "1", True])
def test_spec_rejects_bad_weights(weight) -> None:
    with pytest.raises(ValueError, match="weight must be a finite number"):
        RewardSpec("math_verify", weight=weight)


def test_spec_rejects_non_dict_kwargs() -> None:
    with pytest.raises(ValueError, match="kwargs must be a dict"):
        RewardSpec("math_verify", kwargs=[("a", 1)])


def test_wraps_bool_and_numbers() -> None:
    assert to_reward_result(True, 0.1) == RewardResult(score=1.0, correct=True, time_s=0.1)
    assert to_reward_result(False, 0.0) == RewardResult(score=0.0, correct=False)
    assert to_reward_result(0.25, 0.0) == RewardResult(score=0.25, correct=True)
    assert to_reward_result(-1, 0.0) == RewardResult(score=-1.0, correct=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1.0", None, [1.0]])
def test_odd_returns_fail_closed(value) -> None:
    result = to_reward_result(value, 0.0)
    assert (result.score, result.correct, result.status) == (0.0, False, "error")
    assert result.error


def test_failed_plugin_result_is_forced_to_zero() -> None:
    result = to_reward_result(RewardResult(score=5.0, correct=True, status="parse_fail"), 0.0)
    assert (result.score, result.correct) == (0.0, False)


def test_unknown_status_is_an_error() -> None:
    result = to_reward_result(RewardResult(score=1.0, correct=True, status="great"), 0.0)
    assert result.status == "error" and "unknown status" in result.error


def test_call_reward_passes_fields_and_kwargs() -> None:
    seen = {}

    def fn(prompt, response, answer, metadata, *, scale):
        seen.update(prompt=prompt, response=response, answer=answer, metadata=metadata)
        return 0.5 * scale

    result = call_reward(RewardEntry("fn", fn), REQUEST, {"scale": 2})
    assert result.score == 1.0 and result.status == "ok" and result.time_s >= 0
    assert seen == {"prompt": "p", "response": "r", "answer": "a", "metadata": {"k": 1}}


def test_call_reward_runs_async_functions() -> None:
    async def fn(prompt, response, answer, metadata):
        return True

    assert call_reward(RewardEntry("fn", fn), REQUEST).correct is True
    assert call_reward(RewardEntry("fn", fn), REQUEST).correct is True  # the loop is reused


def test_call_reward_turns_exceptions_into_errors() -> None:
    def fn(prompt, response, answer, metadata):
        raise KeyError("missing")

    result = call_reward(RewardEntry("fn", fn), REQUEST)
    assert (result.score, result.correct, result.status) == (0.0, False, "error")
    assert "KeyError" in result.error


def test_register_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math_verify")(lambda *a: 0.0)


def test_smoke_request_is_gradable() -> None:
    assert "\\boxed{2}" in SMOKE_REQUEST.response and SMOKE_REQUEST.answer == "2"
    assert math.isfinite(SMOKE_REQUEST.metadata["num_response_tokens"])
