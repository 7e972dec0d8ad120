"""The embedded synthetic math task: integer arithmetic with a verifiable ``\\boxed{}`` answer.

A problem is ``"Compute 47 + 38."``; the demonstration response is ``"85 \\boxed{85}"``: the answer, then the
same answer boxed (writing the answer first is what a tiny model learns fastest; restating the operands first,
``"47+38=85"``, was measured to slow the warm start several-fold). The task is generated from a seed (no
files, no hub), so the tiny CPU recipe and the end-to-end tests run anywhere.

Train and test are disjoint by construction: each problem's canonical key (operator plus operands, sorted for
the commutative ``+`` and ``*``) is hashed with a fixed hash, and 1 in ``TEST_BUCKETS`` keys belongs to the test
split. So no test problem (nor its commuted twin) ever appears in train, whatever the seeds and sizes.

Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal

from rl.types import PromptItem

Split = Literal["train", "test"]
Difficulty = Literal["easy", "medium", "hard"]

TEST_BUCKETS = 5
"""One key in ``TEST_BUCKETS`` (by hash) is a test problem: 20% of the problem space is held out."""

_MAX_DRAWS_PER_PROBLEM = 200
"""Draws tried for one operator to find a problem not yet listed; when all are repeats, that operator's
(small) share of the split counts as used up and its problems may repeat from then on."""


@dataclass(frozen=True)
class _OpRange:
    """Operands of one operator: each operand picks one of its ``(lo, hi)`` ranges uniformly, then a value in it
    uniformly (so one- and two-digit operands are equally common when both ranges are listed)."""

    op: str
    a: tuple[tuple[int, int], ...]
    b: tuple[tuple[int, int], ...]


_D1, _D2, _D3 = (0, 9), (10, 99), (100, 999)

DIFFICULTIES: dict[str, tuple[_OpRange, ...]] = {
    # two-digit sums: the tiny model's task (a fixed digit alignment is what it learns within a minute)
    "easy": (_OpRange("+", (_D2,), (_D2,)),),
    # sums and differences of one- and two-digit numbers (mixed alignments are learned several times slower)
    "medium": (_OpRange("+", (_D1, _D2), (_D1, _D2)), _OpRange("-", (_D1, _D2), (_D1, _D2))),
    # three-digit sums and differences, two-digit times one-digit products
    "hard": (_OpRange("+", (_D3,), (_D3,)), _OpRange("-", (_D3,), (_D3,)), _OpRange("*", (_D2,), ((2, 9),))),
}
"""Operators and operand ranges per difficulty. Differences are never negative (``a >= b``)."""

_PROMPT_TEMPLATE = "Problem: {question}\nSolution:\n"


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}: valid are '+', '-', '*'")


def split_of(op: str, a: int, b: int) -> Split:
    """The split a problem belongs to, from a stable hash of its canonical key (commuted twins agree)."""
    if op in ("+", "*"):
        a, b = min(a, b), max(a, b)
    digest = hashlib.blake2b(f"arith:{op}:{a}:{b}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % TEST_BUCKETS == 0 else "train"


def _draw(rng: random.Random, r: _OpRange, split: Split) -> tuple[int, int]:
    """Uniform operands of ``r`` (``a >= b`` for ``-``), redrawn until the problem belongs to ``split``."""
    while True:
        a = rng.randint(*r.a[rng.randrange(len(r.a))])
        b = rng.randint(*r.b[rng.randrange(len(r.b))])
        if r.op == "-" and a < b:
            a, b = b, a
        if split_of(r.op, a, b) == split:
            return a, b


def format_prompt(question: str) -> str:
    """The plain-text prompt (no chat template) for one question; the response starts on the next line."""
    return _PROMPT_TEMPLATE.format(question=question)


def reference_solution(item: PromptItem) -> str:
    """The demonstration response for supervised warm-up: ``"85 \\boxed{85}"`` (no EOS; the trainer appends it)."""
    return f"{item.answer} \\boxed{{{item.answer}}}"


def make_arith_problems(
    num: int,
    seed: int,
    split: Split,
    difficulty: Difficulty = "easy",
) -> list[PromptItem]:
    """``num`` problems of one split, deterministic given ``(num, seed, split, difficulty)``.

    Each problem draws an operator uniformly, then operands uniformly from its range (``a >= b`` for ``-``),
    keeping only problems of ``split``. Problems are distinct while the split's problem space allows it: once
    many draws in a row for one operator find only problems already listed, that operator's problems may repeat
    (the ``easy`` train split has ~6.5k distinct problems, its test split ~1.6k). A longer list with the same
    seed extends a shorter one.

    Returns items with ids ``arith-{split}-{index:06d}``, ``prompt = format_prompt("Compute a op b.")``, the
    gold answer as a decimal string, and metadata ``{source, split, difficulty, op, a, b, question}``.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: valid are 'train', 'test'")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}: valid are {sorted(DIFFICULTIES)}")
    ranges = DIFFICULTIES[difficulty]
    # The split is in the rng seed so that train and test lists are not two filters of one stream.
    rng = random.Random(f"arith:{seed}:{split}:{difficulty}")
    seen: set[tuple[str, int, int]] = set()
    used_up: set[str] = set()
    items: list[PromptItem] = []
    while len(items) < num:
        r = ranges[rng.randrange(len(ranges))]
        for _ in range(_MAX_DRAWS_PER_PROBLEM):
            a, b = _draw(rng, r, split)
            if r.op in used_up or (r.op, a, b) not in seen:
                break
        else:
            used_up.add(r.op)  # this operator's share of the split is (nearly) all listed: repeats from now on
        seen.add((r.op, a, b))
        question = f"Compute {a} {r.op} {b}."
        items.append(PromptItem(
            id=f"arith-{split}-{len(items):06d}",
            prompt=format_prompt(question),
            answer=str(_apply(r.op, a, b)),
            metadata={"source": "arith", "split": split, "difficulty": difficulty,
                      "op": r.op, "a": a, "b": b, "question": question},
        ))
    return items


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (no nested braces), or None. A quick local check;
    the graders in ``rewards/`` are the real verifier."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def is_correct(response: str, answer: str) -> bool:
    """Exact match of the last boxed answer against the gold string."""
    return last_boxed(response) == answer.strip()
