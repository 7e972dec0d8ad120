"""DC-CoT rewards (docs/dccot.md "Rewards", docs/algorithms.md "Overlong penalty"): base table, path penalty
gating, options, and the pool contract."""

from __future__ import annotations

import pytest

from rewards import RewardPool, RewardRequest, RewardSpec, check_spec, load_reward
from rewards.base import SMOKE_REQUEST, call_reward
from rewards.dccot import dccot, dccot_format, dccot_path_penalty

BLOCK = "<spawn_workers><worker_1>a</worker_1><worker_2>b</worker_2><worker_3>c</worker_3></spawn_workers>"
# The response starts inside <think> (the prompt template opened it).
FORMATTED = f"Split.{BLOCK}Combine.</think>\n<answer>so \\boxed{{5}}</answer>"
UNFORMATTED = "Just thinking sequentially.</think>\n<answer>so \\boxed{5}</answer>"
HLP = {
    "max_path_tokens": 12000,
    "overlong_buffer_tokens": 10000,
    "overlong_penalty_factor": 0.9,
    "correct_no_format_score": 0.01,
    "penalty_requires_format": True,
}


def score(response: str, gold: str, path: int, **kwargs) -> float:
    result = dccot("", response, gold, {"longest_path_tokens": path}, **kwargs)
    assert result.status == "ok", result
    return result.score


@pytest.mark.parametrize(("path", "expected"), [(1500, 1.0), (2000, 1.0), (4750, 0.95), (7500, 0.90)])
def test_stage1_correct_and_formatted(path: int, expected: float) -> None:
    assert score(FORMATTED, "5", path) == pytest.approx(expected)


def test_stage1_other_cells() -> None:
    assert score(UNFORMATTED, "5", 4750) == pytest.approx(0.45)  # 0.5 - 0.05: penalty on any correct response
    assert score(FORMATTED, "6", 7500) == 0.0  # wrong: never penalized
    assert score(UNFORMATTED, "6", 7500) == 0.0
    result = dccot("", FORMATTED, "5", {"longest_path_tokens": 10})
    assert result.correct and result.extracted == "5"


@pytest.mark.parametrize(("path", "expected"), [(2000, 1.0), (7000, 0.55), (12000, 0.10)])
def test_hlp_correct_and_formatted(path: int, expected: float) -> None:
    assert score(FORMATTED, "5", path, **HLP) == pytest.approx(expected)


@pytest.mark.parametrize("path", [2000, 7000, 12000])
def test_hlp_correct_no_format_is_flat(path: int) -> None:
    assert score(UNFORMATTED, "5", path, **HLP) == pytest.approx(0.01)


def test_options() -> None:
    with_think = "<think>" + FORMATTED
    assert score(with_think, "5", 10, prepend_think=False) == 1.0
    assert score(with_think, "5", 10) == 0.5  # '<think>' twice breaks the grammar
    assert score(FORMATTED, "5", 10, incorrect_format_score=0.1, correct_score=2.0) == 2.0
    assert score(FORMATTED, "6", 10, incorrect_format_score=0.1) == 0.1
    assert score(FORMATTED, "5", 9000, overlong_buffer_tokens=0) == 1.0
    # the answer must sit inside <answer> ... </answer> with answer_in_answer_tags
    outside = f"Split.{BLOCK}Combine.</think>\n<answer>done</answer>"
    assert dccot("", outside.replace("done", "\\boxed{5}"), "5", {}, answer_in_answer_tags=True,
                 overlong_buffer_tokens=0).correct
    no_block = dccot("", "Split. \\boxed{5}", "5", {}, answer_in_answer_tags=True)
    assert no_block.status == "parse_fail" and no_block.score == 0.0


def test_path_length_source() -> None:
    # without longest_path_tokens the response counts as sequential: its length is its path
    assert dccot("", FORMATTED, "5", {"num_response_tokens": 4750}).score == pytest.approx(0.95)
    with pytest.raises(ValueError, match="longest_path_tokens"):
        dccot("", FORMATTED, "5", {})
    with pytest.raises(ValueError, match="non-negative int"):
        dccot("", FORMATTED, "5", {"longest_path_tokens": "long"})


def test_unparseable_answer_fails_closed() -> None:
    result = dccot("", f"Split.{BLOCK}</think><answer>no idea</answer>", "5", {"longest_path_tokens": 1})
    assert (result.status, result.score, result.correct) == ("parse_fail", 0.0, False)


def test_format_reward() -> None:
    assert dccot_format("", FORMATTED, "", {}).score == 1.0
    assert dccot_format("", UNFORMATTED, "", {}).score == 0.0
    assert dccot_format("", FORMATTED, "", {}, workers_per_block=2).score == 0.0
    assert dccot_format("", f"Split.{BLOCK}e{BLOCK}</think><answer>x</answer>", "", {}, max_spawn_blocks=1).score == 0.0
    with pytest.raises(ValueError, match="workers_per_block"):
        dccot_format("", FORMATTED, "", {}, workers_per_block=0)


def test_path_penalty_reward() -> None:
    assert dccot_path_penalty("", "", "", {"longest_path_tokens": 4750}) == pytest.approx(-0.05)
    assert dccot_path_penalty("", "", "", {"longest_path_tokens": 7000}, max_path_tokens=12000, buffer_tokens=10000,
                              factor=0.9) == pytest.approx(-0.45)
    with pytest.raises(ValueError, match="buffer_tokens"):
        dccot_path_penalty("", "", "", {"longest_path_tokens": 1}, max_path_tokens=10, buffer_tokens=20)


@pytest.mark.parametrize("name", ["dccot", "dccot_format", "dccot_path_penalty"])
def test_registered_and_smoke_callable(name: str) -> None:
    entry = load_reward(RewardSpec(name))
    assert entry.is_verifier == (name == "dccot")
    assert call_reward(entry, SMOKE_REQUEST).status == "ok"


def test_bad_kwargs_rejected_before_start() -> None:
    with pytest.raises(ValueError, match="Did you mean 'overlong_buffer_tokens'"):
        check_spec(RewardSpec("dccot", kwargs={"overlong_bufer_tokens": 10}))
    with pytest.raises(ValueError, match="unexpected keyword argument 'strict'"):
        check_spec(RewardSpec("dccot_format", kwargs={"strict": True}))


def test_through_the_pool() -> None:
    specs = [RewardSpec("dccot"), RewardSpec("dccot_format", weight=0.0)]
    with RewardPool(specs, num_workers=1) as pool:
        good, plain = pool.score([
            RewardRequest("", FORMATTED, "5", {"longest_path_tokens": 4750}),
            RewardRequest("", UNFORMATTED, "5", {"longest_path_tokens": 100}),
        ])
    assert good.correct and good.score == pytest.approx(0.95)
    assert good.components == {"dccot": pytest.approx(0.95), "dccot_format": 1.0}
    assert plain.correct and plain.score == pytest.approx(0.5) and plain.components["dccot_format"] == 0.0
