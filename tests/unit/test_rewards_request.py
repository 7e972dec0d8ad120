"""reward_request: the metadata every graded response carries (training, in-training eval, `rl eval`), and the
start-up smoke call carrying the same keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rl.types import PromptItem, Rollout
from rewards import call_reward, registered_reward, reward_request
from rewards.base import REQUEST_METADATA_KEYS, SMOKE_REQUEST

ITEM = PromptItem(id="arith-17", prompt="Compute 12 + 30.", answer="42", metadata={"level": 2, "source": "arith"})


def rollout(num_tokens: int, finish_reason: str, text: str = "so \\boxed{42}") -> Rollout:
    return Rollout(prompt_id=ITEM.id, prompt_token_ids=[1, 2, 3], response_token_ids=list(range(num_tokens)),
                   logprobs=[-0.5] * num_tokens, finish_reason=finish_reason, policy_version=3, response_text=text)


def test_request_of_a_rollout_carries_its_tokens_finish_reason_and_ids() -> None:
    request = reward_request(ITEM, rollout(30, "length"), sample_index=5)
    assert (request.prompt, request.response, request.answer) == ("Compute 12 + 30.", "so \\boxed{42}", "42")
    assert request.metadata == {"level": 2, "source": "arith", "prompt_id": "arith-17", "sample_index": 5,
                                "num_response_tokens": 30, "finish_reason": "length"}
    assert ITEM.metadata == {"level": 2, "source": "arith"}  # the item's own dict is not touched


def test_request_of_a_dccot_trajectory_carries_its_path_lengths() -> None:
    trajectory = SimpleNamespace(
        response_text="<spawn_workers>...</spawn_workers> so \\boxed{42}", end_reason="budget",
        reward_metadata=lambda: {"longest_path_tokens": 40, "num_response_tokens": 95, "num_spawn_blocks": 1})
    request = reward_request(ITEM, trajectory, sample_index=1)
    assert request.metadata == {"level": 2, "source": "arith", "prompt_id": "arith-17", "sample_index": 1,
                                "num_response_tokens": 95, "finish_reason": "length", "longest_path_tokens": 40,
                                "num_spawn_blocks": 1}
    trajectory.end_reason = "stop"
    assert reward_request(ITEM, trajectory, 0).metadata["finish_reason"] == "stop"


def test_smoke_request_carries_exactly_the_keys_of_a_run() -> None:
    assert set(SMOKE_REQUEST.metadata) == set(REQUEST_METADATA_KEYS)
    assert set(reward_request(PromptItem("p", "q", "1"), rollout(3, "stop"), 0).metadata) == set(REQUEST_METADATA_KEYS)
    assert SMOKE_REQUEST.metadata["num_response_tokens"] == 24 and SMOKE_REQUEST.metadata["finish_reason"] == "stop"


@pytest.mark.parametrize(("num_tokens", "expected"), [(20, 0.0), (30, -0.5), (35, -0.75), (41, -1.0)])
def test_length_penalty_in_tokens_scores_a_built_request(num_tokens: int, expected: float) -> None:
    # free up to 40 - 20 = 20 tokens, then -1 * (L - 20) / 20; the 13-character text would never be penalized
    request = reward_request(ITEM, rollout(num_tokens, "stop"), sample_index=0)
    result = call_reward(registered_reward("length_penalty"), request,
                         {"max_length": 40, "buffer_length": 20, "unit": "tokens"})
    assert result.status == "ok", result.error
    assert result.score == pytest.approx(expected)
