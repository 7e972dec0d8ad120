"""DC-CoT grammar, config validation, budgets and the longest-path measure (docs/dccot.md)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rl.dccot import (
    FORMAT_ERRORS,
    DCCoTConfig,
    DCCoTRewardConfig,
    check_format,
    cut_to_budget,
    path_lengths,
)

W = "<worker_1>a</worker_1><worker_2>b</worker_2><worker_3>c</worker_3>"
BLOCK = f"<spawn_workers>{W}</spawn_workers>"
VALID = f"<think>\nSplit the work.{BLOCK}Combine.</think>\n<answer>so \\boxed{{5}}</answer>"


def test_valid_response_is_parsed() -> None:
    check = check_format(VALID)
    assert check.valid and check.reason is None
    assert check.parsed is not None
    (block,) = check.parsed.blocks
    assert block.director_text == "\nSplit the work."
    assert block.worker_texts == ("a", "b", "c")
    assert check.parsed.final_director == "Combine."
    assert check.parsed.answer_text == "so \\boxed{5}"


@pytest.mark.parametrize(
    "text",
    [
        # whitespace between workers, around the spawn block's edges, and outside the tags
        "\n <think>d<spawn_workers>\n<worker_1>a</worker_1>\n <worker_2>b</worker_2>\n<worker_3>c</worker_3>\n"
        "</spawn_workers></think>\n\n<answer>x</answer>\n",
        # two blocks, empty final director text, empty workers (degenerate but grammatical, pitfall 7)
        f"<think>d{BLOCK}e{BLOCK}</think><answer></answer>",
        "<think>d<spawn_workers><worker_1></worker_1><worker_2></worker_2><worker_3></worker_3></spawn_workers>"
        "</think><answer>x</answer>",
        # tag look-alikes are plain text
        f"<think>d <worker_0> <Think> <worker_01>{BLOCK}</think><answer>x</answer>",
    ],
)
def test_valid_variants(text: str) -> None:
    assert check_format(text).valid, check_format(text)


MALFORMED = [
    ("missing answer", f"<think>d{BLOCK}e</think>", "missing_answer"),
    ("worker order 2,1,3", "<think>d<spawn_workers><worker_2>b</worker_2><worker_1>a</worker_1>"
     "<worker_3>c</worker_3></spawn_workers></think><answer>x</answer>", "worker_order"),
    ("text between workers", "<think>d<spawn_workers><worker_1>a</worker_1> and <worker_2>b</worker_2>"
     "<worker_3>c</worker_3></spawn_workers></think><answer>x</answer>", "text_in_spawn_block"),
    ("spawn right after <think>", f"<think>{BLOCK}e</think><answer>x</answer>", "empty_director_text"),
    ("only whitespace before spawn", f"<think>\n  {BLOCK}e</think><answer>x</answer>", "empty_director_text"),
    ("empty director between blocks", f"<think>d{BLOCK} {BLOCK}</think><answer>x</answer>", "empty_director_text"),
    ("zero spawn blocks", "<think>just thinking</think><answer>x</answer>", "no_spawn_blocks"),
    ("missing </worker_2>", "<think>d<spawn_workers><worker_1>a</worker_1><worker_2>b<worker_3>c</worker_3>"
     "</spawn_workers></think><answer>x</answer>", "unclosed_worker"),
    ("wrong closer", "<think>d<spawn_workers><worker_1>a</worker_2></spawn_workers></think><answer>x</answer>",
     "unclosed_worker"),
    ("text ends in a worker", "<think>d<spawn_workers><worker_1>a", "unclosed_worker"),
    ("spawn inside a worker", f"<think>d<spawn_workers><worker_1>a{BLOCK}</worker_1>", "nested_spawn"),
    ("spawn inside a spawn block", f"<think>d<spawn_workers>{BLOCK}</think><answer>x</answer>", "nested_spawn"),
    ("two workers", "<think>d<spawn_workers><worker_1>a</worker_1><worker_2>b</worker_2></spawn_workers>"
     "</think><answer>x</answer>", "missing_worker"),
    ("a fourth worker", f"<think>d<spawn_workers>{W}<worker_4>e</worker_4></spawn_workers></think><answer>x</answer>",
     "too_many_workers"),
    ("a worker twice", f"<think>d<spawn_workers>{W}<worker_3>e</worker_3></spawn_workers></think><answer>x</answer>",
     "worker_order"),
    ("spawn block not closed", f"<think>d<spawn_workers>{W}</think><answer>x</answer>", "unclosed_spawn"),
    ("text ends in a spawn block", f"<think>d<spawn_workers>{W}", "unclosed_spawn"),
    ("text before <think>", f"Sure! {VALID}", "text_outside_tags"),
    ("text after </answer>", f"{VALID} bye", "text_outside_tags"),
    ("text between </think> and <answer>", f"<think>d{BLOCK}</think> so <answer>x</answer>", "text_outside_tags"),
    ("text after </think>, no answer", f"<think>d{BLOCK}</think> so 5", "text_outside_tags"),
    ("no <think>", "<answer>x</answer>", "missing_think"),
    ("plain text only", "the answer is 5", "text_outside_tags"),
    ("empty text", "", "missing_think"),
    ("stray worker closer in director", f"<think>d</worker_1>{BLOCK}</think><answer>x</answer>", "stray_tag"),
    ("worker outside a spawn block", f"<think>d<worker_1>a</worker_1>{BLOCK}</think><answer>x</answer>", "stray_tag"),
    ("<answer> inside <think>", f"<think>d{BLOCK}<answer>x</answer></think>", "stray_tag"),
    ("<think> twice", f"<think>d{BLOCK}</think><think>", "stray_tag"),
    ("tag inside the answer", f"<think>d{BLOCK}</think><answer>{BLOCK}</answer>", "stray_tag"),
    ("tag after </answer>", f"{VALID}<answer>y</answer>", "stray_tag"),
    ("no </think>", f"<think>d{BLOCK}e", "missing_think_close"),
    ("answer not closed", f"<think>d{BLOCK}</think><answer>x", "unclosed_answer"),
]


@pytest.mark.parametrize(("label", "text", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed(label: str, text: str, reason: str) -> None:
    check = check_format(text)
    assert not check.valid and check.parsed is None
    assert check.reason == reason, check.detail
    assert "at char" in check.detail


def test_spawn_limit() -> None:
    text = f"<think>d{BLOCK}e{BLOCK}</think><answer>x</answer>"
    assert check_format(text, max_spawn_blocks=2).valid
    check = check_format(text, max_spawn_blocks=1)
    assert check.reason == "too_many_spawn_blocks"


def test_workers_per_block_is_exact() -> None:
    two = "<think>d<spawn_workers><worker_1>a</worker_1><worker_2>b</worker_2></spawn_workers>"
    two += "</think><answer>x</answer>"
    assert check_format(two, workers_per_block=2).valid
    assert check_format(VALID, workers_per_block=2).reason == "too_many_workers"
    assert check_format(VALID, workers_per_block=4).reason == "missing_worker"


def test_every_reason_is_exercised() -> None:
    seen = {reason for _, _, reason in MALFORMED} | {"too_many_spawn_blocks"}
    assert seen == set(FORMAT_ERRORS)


# ----------------------------------------------------------------------------------------------- latency


def test_longest_path_reference_case() -> None:
    # director 5, workers 3, 3, 2, director 3 -> L_parallel = 5 + 3 + 3 = 11, L_total = 16.
    lengths = path_lengths([5, 3], [[3, 3, 2]])
    assert (lengths.longest_path_tokens, lengths.total_tokens, lengths.num_spawn_blocks) == (11, 16, 1)
    assert lengths.parallelism == pytest.approx(16 / 11)


def test_longest_path_two_blocks_and_sequential() -> None:
    # 4 + max(2, 7, 1) + 6 + max(5, 5, 5) + 3 = 25; total 4 + 10 + 6 + 15 + 3 = 38
    lengths = path_lengths([4, 6, 3], [[2, 7, 1], [5, 5, 5]])
    assert (lengths.longest_path_tokens, lengths.total_tokens) == (25, 38)
    sequential = path_lengths([9], [])
    assert (sequential.longest_path_tokens, sequential.total_tokens, sequential.parallelism) == (9, 9, 1.0)


def test_budget_cut_reference_case() -> None:
    # With P = 7, T = 9: director(5) + w1[:2] + w2[:2]; w3 and the last director dropped.
    directors, blocks = cut_to_budget([5, 3], [[3, 3, 2]], max_path_tokens=7, max_total_tokens=9)
    assert (directors, blocks) == ([5], [[2, 2]])
    lengths = path_lengths(directors, blocks)
    assert (lengths.longest_path_tokens, lengths.total_tokens) == (7, 9)


def test_budget_cut_only_path_budget() -> None:
    assert cut_to_budget([5, 3], [[3, 3, 2]], max_path_tokens=100) == ([5, 3], [[3, 3, 2]])
    # P = 10: 5 + max(3, 3, 2) = 8, then the director gets 2 of its 3 tokens.
    assert cut_to_budget([5, 3], [[3, 3, 2]], max_path_tokens=10) == ([5, 2], [[3, 3, 2]])
    # P = 5: the director uses the whole path; no worker runs.
    assert cut_to_budget([5, 3], [[3, 3, 2]], max_path_tokens=5) == ([5], [])


# ----------------------------------------------------------------------------------------------- config


def test_config_defaults_and_strictness() -> None:
    cfg = DCCoTConfig()
    assert (cfg.workers_per_block, cfg.max_path_tokens, cfg.max_total_tokens) == (3, 7500, None)
    with pytest.raises(ValidationError, match="Did you mean 'max_spawn_blocks'"):
        DCCoTConfig(max_spawn_block=2)
    with pytest.raises(ValidationError, match="max_total_tokens"):
        DCCoTConfig(max_path_tokens=100, max_total_tokens=50)
    with pytest.raises(ValidationError):
        DCCoTConfig(workers_per_block=0)
    for name, info in DCCoTConfig.model_fields.items():
        assert info.description, name


def test_reward_config_validation() -> None:
    with pytest.raises(ValidationError, match="overlong_buffer_tokens"):
        DCCoTRewardConfig(max_path_tokens=100, overlong_buffer_tokens=200)
    for name, info in DCCoTRewardConfig.model_fields.items():
        assert info.description, name
