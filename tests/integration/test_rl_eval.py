"""`rl eval` end to end on the tiny CPU model (real Ray, real vLLM, math-verify): outputs, resume, prompts longer
than the context, a training checkpoint folder as the model, the built-in arith benchmark. (Bad rows and over-long
prompts stopping `rl eval` before any engine starts: tests/unit/test_rl_eval_checks.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def rl_eval(model_dir: str, data: Path | str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "trainers.cli", "eval", "--model", model_dir, "--benchmarks", str(data), "--n", "4",
            "--k", "1,2,4", "--temperature", "1.0", "--top-p", "1.0", "--max-tokens", "16", "--chat-template", "off",
            "--prompt-template", "Problem: {problem}\nSolution:\n", "--out", str(out), "--no-progress",
            "--num-resamples", "200", "--reward-workers", "1", *extra]
    return subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=600)


# 300 digits, one token each: over the tiny model's 256-token context
LONG_ROW = json.dumps({"id": "too-long", "problem": f"Compute {'1' * 300} + 1.", "answer": "2", "level": "+"})


def _problems(tmp_path: Path, bad_line: int | None = None, long_row: bool = False) -> Path:
    from rl.data.arith import make_arith_problems

    rows = [json.dumps({"id": it.id, "problem": it.metadata["question"], "answer": it.answer,
                        "level": it.metadata["op"]}) for it in make_arith_problems(20, seed=3, split="test")]
    if bad_line is not None:
        rows[bad_line - 1] = '{"id": "broken", "problem": "Compute 1 + 1."'
    rows = [LONG_ROW] * long_row + rows
    path = tmp_path / ("bad.jsonl" if bad_line else "arith20.jsonl")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_rl_eval_writes_outputs_then_resumes_without_generating(tiny_model_dir, tmp_path):
    """A training checkpoint folder as the model (the trainer's layout: weights and tokenizer in model/), one
    over-long prompt skipped, and the built-in arith benchmark next to a file."""
    from rl.data.arith import make_arith_problems

    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    shutil.copytree(tiny_model_dir, ckpt / "model")
    data, out = _problems(tmp_path, long_row=True), tmp_path / "out"
    benchmarks, extra = f"{data},arith", ("--limit", "21,8", "--on-long-prompt", "skip")
    first = rl_eval(str(ckpt), benchmarks, out, *extra)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "eager)" in first.stdout  # the CPU default
    assert "arith20: skipped 1 prompt(s)" in first.stdout
    for name in ("generations.jsonl", "summary.json", "summary.md", "pass_at_k.png"):
        assert (out / name).stat().st_size > 0, name
    lines = (out / "generations.jsonl").read_text().splitlines()
    rows = [json.loads(ln) for ln in lines if json.loads(ln)["benchmark"] == "arith20"]
    builtin = [json.loads(ln) for ln in lines if json.loads(ln)["benchmark"] == "arith"]
    assert len(rows) == 20 * 4 and len(builtin) == 8 * 4
    assert {r["prompt"] for r in builtin} == {it.prompt for it in make_arith_problems(8, seed=1, split="test")}
    assert {(r["id"], r["sample_index"]) for r in rows} == {(r["id"], i) for r in rows for i in range(4)}
    assert all({"prompt", "response", "answer", "correct", "extracted", "status"} <= set(r) for r in rows)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["this_run"]["tokens_per_s"] > 0
    assert summary["model_dir"] == str(ckpt / "model") and summary["max_model_len"] == 256
    assert summary["skipped_long_prompts"]["arith20"]["ids"] == ["too-long"]
    assert summary["skipped_long_prompts"]["arith20"]["prompt_tokens"][0] > 300
    assert summary["all_runs"]["runs"] == 1
    assert summary["all_runs"]["response_tokens"] == sum(r["num_tokens"] for r in rows + builtin)
    assert summary["results"]["arith"]["num_problems"] == 8
    res = summary["results"]["arith20"]
    assert res["num_problems"] == 20 and res["n"] == 4
    curve = [res["pass@k"][str(k)]["value"] for k in (1, 2, 3, 4)]
    assert curve == sorted(curve)  # pass@k never falls with k
    assert res["pass@k"]["1"]["value"] == pytest.approx(res["mean@n"]["value"])
    assert res["pass@k"]["1"]["value"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    for est in res["pass@k"].values():
        assert est["ci_low"] <= est["value"] <= est["ci_high"]
    assert set(res["by"]["level"]) <= {"+", "-", "*"}  # breakdown by the data's level field
    table = (out / "summary.md").read_text()
    assert "| arith20 | 20 | 4 |" in table and table.strip() in first.stdout
    assert "Skipped, prompt + 16 response tokens > max_model_len 256: arith20: 1" in table

    second = rl_eval(str(ckpt), benchmarks, out, *extra)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "28 already done" in second.stdout and "engine(s) up" not in second.stdout
    assert (out / "generations.jsonl").read_text().splitlines() == lines
    again = json.loads((out / "summary.json").read_text())
    assert again["results"] == summary["results"]
    assert again["all_runs"] == summary["all_runs"] and again["this_run"]["response_tokens"] == 0

    changed = rl_eval(str(ckpt), benchmarks, out, *extra, "--seed", "1")
    assert changed.returncode == 2 and "other settings" in changed.stderr
