"""Gold self-consistency on the real benchmark files: for every row, a response ending in the gold answer
(boxed, after a <think> block holding a different boxed answer) is graded correct, and a response with a
wrong answer is graded incorrect.

Data: every ``*.jsonl`` in ``$RL_DATA_DIR`` (default ``<repo>/../shared/data``), rows ``{id, problem, answer,
source}``. ``math_train.jsonl`` (7,472 rows) is checked on a fixed random subset of 500 rows (seed 0) so the
whole module runs in a couple of minutes; every other file is checked in full. Grading runs in-process with
the verifier core (no pool) for speed.

Measured (2026-11-23): 100% correct-when-gold and 0 false positives on all 11 files (11,844 rows checked).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from rewards.math_verifier import grade_math, parse_gold

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("RL_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
SAMPLE_ROWS = {"math_train": 500}
FILES = sorted(DATA_DIR.glob("*.jsonl"))

# Golds that math-verify cannot turn into math, so they are matched only as exact strings: a response that
# copies the gold is still graded correct (asserted below), but an equivalent rewriting would not be.
# Each is a quirk of the source data, listed so that a new one shows up as a test failure.
STRING_ONLY_GOLDS = {
    "minerva-27": "an ODE with astrophysical symbols (M_{\\odot}, L_{\\odot}) that the LaTeX grammar rejects",
    "minerva-269": "'E_{1},E_{2}': a list of two subscripted symbols the grammar rejects",
    "olympiadbench-1782": "'m_{\\max }=n^{2}-n-1': \\max inside a subscript is not parseable",
    "olympiadbench-2045": "'t(0,4]': malformed source answer (reads as 't in (0,4]')",
}

_NUMBER_RE = re.compile(r"^-?\d+(?:\.\d+)?$")


def _canonical(text: str) -> str:
    return re.sub(r"\s|\$|\\left|\\right|\\!|\\,", "", text).replace("\\dfrac", "\\frac")


def _load(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    sample = SAMPLE_ROWS.get(path.stem)
    if sample is not None and len(rows) > sample:
        rows = random.Random(0).sample(rows, sample)
    return rows


def _wrong_answer(row: dict, rows: list[dict], rng: random.Random) -> str:
    """A different answer: gold + 1 for plain numbers, else another row's gold with a different form."""
    gold = row["answer"].strip().strip("$").replace(",", "")
    if _NUMBER_RE.match(gold):
        return str(int(gold) + 1) if "." not in gold else f"{float(gold) + 1:g}"
    for _ in range(100):
        other = rows[rng.randrange(len(rows))]["answer"]
        if _canonical(other) != _canonical(row["answer"]):
            return other
    raise AssertionError(f"no different answer found for {row['id']}")


def _response(final: str, distractor: str) -> str:
    return (
        f"<think>\nFirst guess: $\\boxed{{{distractor}}}$. Let me re-check the algebra...\n</think>\n"
        f"Working through it carefully, the final answer is $\\boxed{{{final}}}$."
    )


def test_data_dir_has_benchmarks() -> None:
    assert FILES, f"no *.jsonl files in {DATA_DIR}; set RL_DATA_DIR to the folder with the math data"


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_gold_self_consistency(path: Path) -> None:
    rows = _load(path)
    rng = random.Random(1)
    missed, false_positives, string_only = [], [], set()
    for row in rows:
        gold = row["answer"]
        wrong = _wrong_answer(row, rows, rng)
        right_result = grade_math(row["problem"], _response(gold, wrong), gold, {})
        if not right_result.correct:
            missed.append((row["id"], gold, right_result.status, right_result.extracted, right_result.error))
        wrong_result = grade_math(row["problem"], _response(wrong, gold), gold, {})
        if wrong_result.correct:
            false_positives.append((row["id"], gold, wrong))
        if not any(not isinstance(item, str) for item in parse_gold(gold)):
            string_only.add(row["id"])
    rate = 1 - len(missed) / len(rows)
    print(f"\n{path.stem}: {len(rows)} rows, gold graded correct {rate:.2%}, "
          f"wrong graded correct {len(false_positives)}, string-only golds {sorted(string_only)}")
    assert not missed, f"{path.stem}: {len(missed)}/{len(rows)} golds graded incorrect: {missed[:20]}"
    assert not false_positives, f"{path.stem}: wrong answers graded correct: {false_positives[:20]}"
    assert string_only <= set(STRING_ONLY_GOLDS), f"new string-only golds: {sorted(string_only - set(STRING_ONLY_GOLDS))}"
