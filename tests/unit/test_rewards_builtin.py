"""format_boxed and length_penalty."""

from __future__ import annotations

import pytest

from rewards.builtin import format_boxed, length_penalty


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so \\boxed{5}", 1.0),
        ("<think>\\boxed{4}</think> so \\boxed{5}", 1.0),
        ("\\fbox{5}", 1.0),
        ("no box", 0.0),
        ("\\boxed{4} and \\boxed{5}", 0.0),
        ("\\boxed{5", 0.0),
        ("\\boxed{5} and \\boxed{6", 0.0),
        ("<think>\\boxed{4}</think> no box", 0.0),
    ],
)
def test_format_boxed(response: str, expected: float) -> None:
    assert format_boxed("", response, "", {}).score == expected


def test_format_boxed_rejects_options() -> None:
    with pytest.raises(ValueError, match="no options"):
        format_boxed("", "", "", {}, strict=True)


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (60, 0.0), (70, -0.25), (80, -0.5), (100, -1.0), (500, -1.0)],
)
def test_length_penalty_ramp(length: int, expected: float) -> None:
    # free up to 100 - 40 = 60; linear to -1 at 100.
    score = length_penalty("", "x" * length, "", {}, max_length=100, buffer_length=40)
    assert score == pytest.approx(expected)


def test_length_penalty_units() -> None:
    assert length_penalty("", "a b c", "", {}, max_length=2, buffer_length=0, unit="words") == -1.0
    tokens = {"num_response_tokens": 75}
    assert length_penalty("", "", "", tokens, max_length=100, buffer_length=50, unit="tokens", penalty=2.0) == -1.0
    with pytest.raises(ValueError, match="num_response_tokens"):
        length_penalty("", "", "", {}, unit="tokens")


@pytest.mark.parametrize(
    "kwargs",
    [dict(unit="bytes"), dict(max_length=0), dict(max_length=10, buffer_length=11), dict(penalty=-1.0)],
)
def test_length_penalty_validates_options(kwargs) -> None:
    with pytest.raises(ValueError, match="length_penalty"):
        length_penalty("", "", "", {}, **kwargs)
