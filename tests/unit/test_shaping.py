"""The one overlong penalty (``rl.shaping``) and its callers: hand-computed values at every boundary of
docs/algorithms.md "Overlong penalty", and the DAPO shaping, the ``length_penalty`` reward and the DC-CoT rewards
all returning exactly its value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rl.shaping import overlong_penalty

# (length, max_len, buffer_len, factor, expected); S = max_len - buffer_len is where the penalty starts
CASES = [
    # DAPO's recipe: 20480 tokens, buffer 4096, factor 1
    (16000, 20480, 4096, 1.0, 0.0),
    (16384, 20480, 4096, 1.0, 0.0),  # exactly at S: no penalty yet
    (16385, 20480, 4096, 1.0, -1 / 4096),  # one past S
    (18432, 20480, 4096, 1.0, -0.5),
    (20479, 20480, 4096, 1.0, -4095 / 4096),
    (20480, 20480, 4096, 1.0, -1.0),  # exactly at max_len: the full factor
    (30000, 20480, 4096, 1.0, -1.0),  # beyond max_len: capped
    (0, 20480, 4096, 1.0, 0.0),
    # the factor scales the ramp and the cap (-factor at max_len, not -1)
    (40, 48, 16, 0.5, -0.25),
    (48, 48, 16, 0.5, -0.5),
    (96, 48, 16, 0.5, -0.5),
    # DC-CoT stage 1 (7500, 5500, 0.1) and the high-length-penalty stage (12000, 10000, 0.9), longest path
    (1500, 7500, 5500, 0.1, 0.0),
    (2000, 7500, 5500, 0.1, 0.0),
    (4750, 7500, 5500, 0.1, -0.05),
    (7500, 7500, 5500, 0.1, -0.1),
    (7000, 12000, 10000, 0.9, -0.45),
    (12000, 12000, 10000, 0.9, -0.9),
    # the tiny latency recipe: reward limit 64 with a path budget of 96; paths past 64 stay at -0.6
    (40, 64, 48, 0.6, -0.3),
    (96, 64, 48, 0.6, -0.6),
    # buffer 0: a hard limit (0 up to and including max_len, -factor beyond)
    (100, 100, 0, 0.9, 0.0),
    (101, 100, 0, 0.9, -0.9),
    (500, 100, 0, 0.9, -0.9),
    # buffer = max_len: the ramp starts at 0
    (0, 10, 10, 1.0, 0.0),
    (5, 10, 10, 1.0, -0.5),
    # factor 0: never a penalty
    (500, 100, 40, 0.0, 0.0),
]


@pytest.mark.parametrize(("length", "max_len", "buffer", "factor", "expected"), CASES)
def test_overlong_penalty_boundaries(length, max_len, buffer, factor, expected):
    value = overlong_penalty(length, max_len, buffer, factor)
    assert value == pytest.approx(expected, abs=1e-12)
    assert type(value) is float


def test_no_penalty_is_positive_zero():
    assert str(overlong_penalty(16384, 20480, 4096)) == "0.0"


@pytest.mark.parametrize(("max_len", "buffer", "factor"), [(48, -1, 1.0), (48, 49, 1.0), (48, 16, -0.1)])
def test_overlong_penalty_rejects_bad_arguments(max_len, buffer, factor):
    with pytest.raises(ValueError, match="overlong"):
        overlong_penalty(10, max_len, buffer, factor)


@pytest.mark.parametrize(("length", "max_len", "buffer", "factor", "expected"), CASES)
def test_every_caller_returns_the_shared_value(length, max_len, buffer, factor, expected):
    from rewards.builtin import length_penalty
    from rewards.dccot import dccot_path_penalty
    from rl.algorithms.dapo import overlong_penalty as dapo_penalty

    value = overlong_penalty(length, max_len, buffer, factor)
    assert dapo_penalty is overlong_penalty  # what the driver's DAPO shaping calls
    tokens = {"num_response_tokens": length}
    assert length_penalty("", "", "", tokens, max_length=max_len, buffer_length=buffer, penalty=factor,
                          unit="tokens") == value
    assert length_penalty("", "x" * length, "", {}, max_length=max_len, buffer_length=buffer, penalty=factor) == value
    assert dccot_path_penalty("", "", "", {"longest_path_tokens": length}, max_path_tokens=max_len,
                              buffer_tokens=buffer, factor=factor) == value


def test_shared_module_imports_no_torch():
    code = "import sys, rl.shaping, rewards.builtin, rewards.dccot; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
