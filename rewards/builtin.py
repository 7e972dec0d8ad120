"""Built-in format and length rewards (cheap, pure text).

Both follow the common reward signature ``fn(prompt, response, answer, metadata, **kwargs)``.
"""

from __future__ import annotations

from typing import Any

from rl.shaping import overlong_penalty
from rl.types import RewardResult
from rewards.base import register_reward
from rewards.extract import MAX_SCAN_CHARS, find_boxed, sanitize, strip_thinking

_LENGTH_UNITS = ("chars", "words", "tokens")


@register_reward("format_boxed", description="1 if the final answer (after </think>) has exactly one closed \\boxed{}")
def format_boxed(prompt: str, response: str, answer: str, metadata: dict, **kwargs: Any) -> RewardResult:
    """1.0 when the text after the last ``</think>`` holds exactly one ``\\boxed{...}``/``\\fbox{...}``
    and it is closed; else 0.0. The gold answer is not looked at."""
    if kwargs:
        raise ValueError(f"format_boxed takes no options, got {sorted(kwargs)}")
    final_text, _ = strip_thinking(sanitize(response))
    final_text = final_text[-MAX_SCAN_CHARS:]
    boxed = find_boxed(final_text)
    num_starts = final_text.count("\\boxed") + final_text.count("\\fbox")
    ok = len(boxed) == 1 and num_starts == 1
    return RewardResult(score=1.0 if ok else 0.0, correct=ok, extracted=boxed[0][2] if ok else None)


def _length_of(response: str, metadata: dict, unit: str) -> int:
    if unit == "chars":
        return len(response)
    if unit == "words":
        return len(response.split())
    tokens = metadata.get("num_response_tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise ValueError(
            "length_penalty with unit='tokens' needs an int metadata['num_response_tokens'] "
            f"(got {tokens!r}); pass it from the rollout or use unit='chars'/'words'"
        )
    return tokens


@register_reward("length_penalty", description="0 up to max_length - buffer_length, then linearly down to -penalty")
def length_penalty(
    prompt: str,
    response: str,
    answer: str,
    metadata: dict,
    *,
    max_length: int = 16384,
    buffer_length: int = 4096,
    penalty: float = 1.0,
    unit: str = "chars",
) -> float:
    """Soft over-length penalty (DAPO-style, https://arxiv.org/abs/2503.14476 section 3.4).

    With L the response length in ``unit`` (``"chars"``, ``"words"`` or ``"tokens"``, the last read from
    ``metadata["num_response_tokens"]``): 0 when L <= max_length - buffer_length; then linear down to
    ``-penalty`` at L = max_length; ``-penalty`` beyond; ``buffer_length=0`` is a hard limit
    (``rl.shaping.overlong_penalty``, ``docs/algorithms.md`` "Overlong penalty").
    """
    if unit not in _LENGTH_UNITS:
        raise ValueError(f"length_penalty: unit must be one of {_LENGTH_UNITS}, got {unit!r}")
    if not (isinstance(max_length, int) and max_length > 0):
        raise ValueError(f"length_penalty: max_length must be a positive int, got {max_length!r}")
    if not (isinstance(buffer_length, int) and 0 <= buffer_length <= max_length):
        raise ValueError(f"length_penalty: buffer_length must be an int in [0, max_length], got {buffer_length!r}")
    if not penalty >= 0:
        raise ValueError(f"length_penalty: penalty must be >= 0, got {penalty!r}")
    return overlong_penalty(_length_of(response, metadata, unit), max_length, buffer_length, penalty)
