"""DC-CoT rewards (``docs/dccot.md`` "Rewards"): the combined reward, format validity, path penalty.

``response`` is a trajectory's ``response_text`` (the director's view, each worker once; ``rollout/dccot.py``);
the longest path comes from ``metadata["longest_path_tokens"]`` (``Trajectory.reward_metadata()``). Without it,
``metadata["num_response_tokens"]`` is used: the longest path of a sequential response is its length.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from rl.dccot import ANSWER_CLOSE, ANSWER_OPEN, DCCoTRewardConfig, check_format
from rl.shaping import overlong_penalty
from rl.types import RewardResult
from rewards.base import register_reward
from rewards.math_verifier import grade_math

_THINK_PREFIX = "<think>\n"


@lru_cache(maxsize=32)
def _config(items: tuple) -> DCCoTRewardConfig:
    return DCCoTRewardConfig(**dict(items))


def _reward_config(kwargs: dict) -> DCCoTRewardConfig:
    try:
        return _config(tuple(sorted(kwargs.items())))
    except TypeError:  # an unhashable option value: validate without the cache (pydantic reports it)
        return DCCoTRewardConfig(**kwargs)


def _longest_path(metadata: dict) -> int:
    for key in ("longest_path_tokens", "num_response_tokens"):
        value = metadata.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"metadata[{key!r}] must be a non-negative int, got {value!r}")
            return value
    raise ValueError(
        "the DC-CoT path penalty needs metadata['longest_path_tokens'] (Trajectory.reward_metadata()) or "
        "metadata['num_response_tokens']; pass it from the rollout or set overlong_buffer_tokens=0"
    )


def _answer_block(text: str) -> str | None:
    end = text.rfind(ANSWER_CLOSE)
    start = text.rfind(ANSWER_OPEN, 0, end) if end >= 0 else -1
    return text[start + len(ANSWER_OPEN) : end] if start >= 0 else None


@register_reward(
    "dccot",
    is_verifier=True,
    description="DC-CoT: 1 correct+format, correct_no_format_score, else 0; plus a longest-path overlong penalty",
    check_kwargs=_reward_config,
)
def dccot(prompt: str, response: str, answer: str, metadata: dict, **kwargs: Any) -> RewardResult:
    """The DC-CoT reward of ``docs/dccot.md`` "Rewards", options in :class:`rl.dccot.DCCoTRewardConfig`.

    base = ``correct_score`` (correct, format-valid), ``correct_no_format_score`` (correct, format-invalid),
    ``incorrect_format_score`` (wrong, format-valid), 0 (wrong, format-invalid); plus, on correct responses
    (and format-valid ones only with ``penalty_requires_format``), ``overlong_penalty(L_parallel)``.
    Correctness is the ``math_verify`` grade of the text after the last ``</think>`` (or inside the last
    ``<answer>`` block); its parse failures and errors are returned as such (score 0, counted by the pool).
    """
    cfg = _reward_config(kwargs)
    text = _THINK_PREFIX + response if cfg.prepend_think else response
    fmt = check_format(text, cfg.workers_per_block, cfg.max_spawn_blocks)
    graded = _answer_block(text) if cfg.answer_in_answer_tags else text
    if graded is None:
        return RewardResult(score=0.0, correct=False, status="parse_fail", error="no <answer>...</answer> block")
    verdict = grade_math(prompt, graded, answer, metadata)
    if verdict.status != "ok":
        return verdict
    if verdict.correct:
        base = cfg.correct_score if fmt.valid else cfg.correct_no_format_score
    else:
        base = cfg.incorrect_format_score if fmt.valid else 0.0
    penalty = 0.0
    if verdict.correct and (fmt.valid or not cfg.penalty_requires_format) and cfg.overlong_buffer_tokens > 0:
        penalty = overlong_penalty(
            _longest_path(metadata), cfg.max_path_tokens, cfg.overlong_buffer_tokens, cfg.overlong_penalty_factor
        )
    return RewardResult(score=base + penalty, correct=verdict.correct, extracted=verdict.extracted)


@register_reward(
    "dccot_format",
    description="1 if the response follows the DC-CoT spawn/worker grammar, else 0",
)
def dccot_format(
    prompt: str,
    response: str,
    answer: str,
    metadata: dict,
    *,
    workers_per_block: int = 3,
    max_spawn_blocks: int | None = None,
    prepend_think: bool = True,
) -> RewardResult:
    """1.0 when ``check_format`` accepts the response (``<think>\\n`` prepended unless ``prepend_think=False``),
    else 0.0. The gold answer is not looked at."""
    if isinstance(workers_per_block, bool) or not isinstance(workers_per_block, int) or workers_per_block < 1:
        raise ValueError(f"dccot_format: workers_per_block must be a positive int, got {workers_per_block!r}")
    text = _THINK_PREFIX + response if prepend_think else response
    fmt = check_format(text, workers_per_block, max_spawn_blocks)
    return RewardResult(score=1.0 if fmt.valid else 0.0, correct=fmt.valid)


@register_reward(
    "dccot_path_penalty",
    description="0 up to max_path_tokens - buffer_tokens on the longest path, then linearly down to -factor",
)
def dccot_path_penalty(
    prompt: str,
    response: str,
    answer: str,
    metadata: dict,
    *,
    max_path_tokens: int = 7500,
    buffer_tokens: int = 5500,
    factor: float = 0.1,
) -> float:
    """The overlong penalty on the longest path alone, ungated (add it to any correctness reward);
    ``buffer_tokens=0`` is a hard limit at ``max_path_tokens`` (``docs/algorithms.md`` "Overlong penalty")."""
    if not (isinstance(max_path_tokens, int) and 0 <= buffer_tokens <= max_path_tokens and factor >= 0):
        raise ValueError(
            "dccot_path_penalty: need an int max_path_tokens >= buffer_tokens >= 0 and factor >= 0, got "
            f"{max_path_tokens!r}, {buffer_tokens!r}, {factor!r}"
        )
    return overlong_penalty(_longest_path(metadata), max_path_tokens, buffer_tokens, factor)
