"""Round-robin: deal a sequence out over k workers, and interleave sequences back into one.

``interleave(deal(xs, k)) == xs`` for every k >= 1, so requests spread over engines come back in request order
when each engine returns its share in order. Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def deal(items: Sequence[T], k: int) -> list[list[T]]:
    """``k`` shares of ``items``, item i to share ``i % k``: ``deal([0..4], 2) == [[0, 2, 4], [1, 3]]``. Shares
    past the number of items are empty (and only those)."""
    if k < 1:
        raise ValueError(f"round-robin over {k} workers: need at least one")
    return [list(items[i::k]) for i in range(k)]


def interleave(seqs: Sequence[Sequence[T]]) -> list[T]:
    """First items of every sequence in order, then the second items, ...; an exhausted sequence is skipped:
    ``interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]``, ``interleave([["a1", "a2", "a3"], ["b1"]]) ==
    ["a1", "b1", "a2", "a3"]``."""
    out: list[T] = []
    for j in range(max(map(len, seqs), default=0)):
        out.extend(s[j] for s in seqs if j < len(s))
    return out
