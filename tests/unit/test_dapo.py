"""DAPO's overlong shaping and dynamic-sampling filter: the hand-computed cases of docs/algorithms.md "DAPO"."""

import pytest

from rl.algorithms.dapo import keep_group, overlong_penalty


@pytest.mark.parametrize(
    ("length", "expected"),
    [(16000, 0.0), (16384, 0.0), (18432, -0.5), (20480, -1.0), (30000, -1.0), (0, 0.0)],
)
def test_overlong_penalty_reference_cases(length, expected):
    assert overlong_penalty(length, max_len=20480, buffer_len=4096) == pytest.approx(expected)


def test_overlong_penalty_factor_scales_and_eos_at_budget():
    # EOS exactly at L_max gives -penalty_factor, not -1.
    assert overlong_penalty(48, max_len=48, buffer_len=16, penalty_factor=0.5) == pytest.approx(-0.5)
    assert overlong_penalty(40, max_len=48, buffer_len=16, penalty_factor=0.5) == pytest.approx(-0.25)
    assert overlong_penalty(32, max_len=48, buffer_len=16, penalty_factor=0.5) == 0.0


@pytest.mark.parametrize("buffer_len", [-1, 49])
def test_overlong_penalty_rejects_bad_buffer(buffer_len):
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(10, max_len=48, buffer_len=buffer_len)


def test_keep_group_reference_case():
    groups = [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1]]
    assert [keep_group(g) for g in groups] == [False, False, True, True]
    assert keep_group([]) is False
    assert keep_group([0.5, 0.5000001]) is True
