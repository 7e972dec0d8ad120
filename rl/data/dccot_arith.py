"""The embedded DC-CoT task: sums of six one-digit numbers, solved by three parallel workers.

A problem is ``"Compute 3 + 5 + 7 + 2 + 8 + 4."``; its prompt ends inside the think block (``<think>\\n``), as
the DC-CoT template does (``docs/dccot.md`` "Format"), so the response starts with director text.
The demonstration splits the six terms into three pairs, one per worker, and the director adds the three partial
sums::

    Pair up.<spawn_workers><worker_1>3+5=8</worker_1><worker_2>7+2=9</worker_2><worker_3>8+4=12</worker_3>
    </spawn_workers>8+9+12=29</think><answer>\\boxed{29}</answer>

(one line in reality). Demonstrations come in two styles that differ only in length, not in the arithmetic:
``concise`` (above) and ``verbose``, whose director restates the problem and whose workers restate their pair
(``"Add 3 and 5: 3+5=8"``). A model warm-started on both mixes them; a latency penalty on the longest path should
move it to the concise style at the same accuracy, which is what the latency experiment measures
(``docs/dccot.md``).

Train and test are disjoint by construction (a stable hash of the sorted terms, as ``rl.data.arith``). Pure
Python: no torch, no I/O.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from rl.dccot import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    SPAWN_CLOSE,
    SPAWN_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    worker_close,
    worker_open,
)
from rl.types import PromptItem

Split = Literal["train", "test"]
Style = Literal["concise", "verbose"]
STYLES: tuple[str, ...] = ("concise", "verbose")

NUM_TERMS = 6
"""Terms per problem: one pair per worker, three workers."""

TEST_BUCKETS = 5
"""One multiset of terms in ``TEST_BUCKETS`` (by hash) is a test problem."""

_PROMPT_TEMPLATE = "Problem: {question}\nSolution:\n" + THINK_OPEN + "\n"

DCCOT_TAGS: tuple[str, ...] = (
    THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, SPAWN_OPEN, SPAWN_CLOSE,
    *(tag for i in (1, 2, 3) for tag in (worker_open(i), worker_close(i))),
)
"""Every tag of the grammar with three workers; the tiny DC-CoT tokenizer makes each one token."""


def split_of(terms: tuple[int, ...]) -> Split:
    """The split of a problem, from a stable hash of its sorted terms (reorderings agree)."""
    key = ",".join(map(str, sorted(terms)))
    digest = hashlib.blake2b(f"dccot-sum:{key}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % TEST_BUCKETS == 0 else "train"


def format_prompt(question: str) -> str:
    """The plain-text prompt (no chat template), ending in ``<think>\\n``."""
    return _PROMPT_TEMPLATE.format(question=question)


def make_sum_problems(num: int, seed: int, split: Split) -> list[PromptItem]:
    """``num`` distinct problems of one split, deterministic given ``(num, seed, split)``.

    Terms are uniform in 0..9. Ids ``dccot-sum-{split}-{index:06d}``; metadata ``{source, split, terms, question}``.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: valid are 'train', 'test'")
    rng = random.Random(f"dccot-sum:{seed}:{split}")
    seen: set[tuple[int, ...]] = set()
    items: list[PromptItem] = []
    while len(items) < num:
        terms = tuple(rng.randint(0, 9) for _ in range(NUM_TERMS))
        if terms in seen or split_of(terms) != split:
            continue
        seen.add(terms)
        question = "Compute " + " + ".join(map(str, terms)) + "."
        items.append(PromptItem(
            id=f"dccot-sum-{split}-{len(items):06d}",
            prompt=format_prompt(question),
            answer=str(sum(terms)),
            metadata={"source": "dccot_sum", "split": split, "terms": list(terms), "question": question},
        ))
    return items


def demonstration(item: PromptItem, style: Style = "concise") -> str:
    """The DC-CoT response for ``item`` in one of :data:`STYLES` (no EOS; the trainer appends it).

    Format-valid under ``rl.dccot.check_format(THINK_OPEN + "\\n" + response)`` with three workers.
    """
    if style not in STYLES:
        raise ValueError(f"unknown demonstration style {style!r}: valid are {list(STYLES)}")
    terms = list(item.metadata["terms"])
    pairs = [(terms[2 * i], terms[2 * i + 1]) for i in range(3)]
    partial = [a + b for a, b in pairs]
    if style == "concise":
        director = "Pair up."
        workers = [f"{a}+{b}={s}" for (a, b), s in zip(pairs, partial)]
        final = "+".join(map(str, partial)) + f"={sum(partial)}"
    else:
        director = "Add " + " + ".join(map(str, terms)) + " in pairs."
        workers = [f"Add {a} and {b}: {a}+{b}={s}" for (a, b), s in zip(pairs, partial)]
        final = "Now " + "+".join(map(str, partial)) + f"={sum(partial)}"
    block = SPAWN_OPEN + "".join(worker_open(i) + w + worker_close(i) for i, w in enumerate(workers, 1)) + SPAWN_CLOSE
    return f"{director}{block}{final}{THINK_CLOSE}{ANSWER_OPEN}\\boxed{{{sum(terms)}}}{ANSWER_CLOSE}"
