"""`rl eval` stops before any engine starts (no Ray, no vLLM) on a malformed benchmark row, naming its file and
line, and on a prompt that leaves no room for the response, naming it and the way to skip it."""

from __future__ import annotations

import pytest

from tests.integration.test_rl_eval import _problems, rl_eval

pytestmark = pytest.mark.slow  # two `rl eval` processes: imports and the tokenizer, seconds each


def test_malformed_row_is_reported_with_its_line(tiny_model_dir, tmp_path):
    proc = rl_eval(tiny_model_dir, _problems(tmp_path, bad_line=7), tmp_path / "bad_out")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "bad.jsonl:7: not valid JSON" in proc.stderr
    assert "engine(s) up" not in proc.stdout  # fails before any engine starts

    long = rl_eval(tiny_model_dir, _problems(tmp_path, long_row=True), tmp_path / "long_out")
    assert long.returncode == 2, long.stdout[-2000:] + long.stderr[-2000:]
    assert "leave no room for 16 response tokens within max_model_len 256: arith20/too-long (" in long.stderr
    assert "--on-long-prompt skip" in long.stderr and "engine(s) up" not in long.stdout
