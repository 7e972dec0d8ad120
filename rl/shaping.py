"""Reward shaping shared by the trainer and the reward functions: the soft overlong penalty.

Pure Python (no torch, no numpy): reward workers import it. Formulas and the boundary cases:
``docs/algorithms.md`` "Overlong penalty".
"""

from __future__ import annotations


def overlong_penalty(length: int, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> float:
    """Soft overlong punishment (DAPO, arXiv 2503.14476) of a response of ``length`` units, added to its reward.

    With S = ``max_len - buffer_len``: 0 while ``length <= S``; then ``-(length - S) / buffer_len *
    penalty_factor``, exactly ``-penalty_factor`` at ``length == max_len``; ``-penalty_factor`` beyond
    ``max_len`` (capped). ``buffer_len == 0`` is a hard limit: 0 up to and including ``max_len``,
    ``-penalty_factor`` beyond. The unit (tokens, characters, longest-path tokens) is the caller's.
    """
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len must be in 0..max_len={max_len}, got {buffer_len}")
    if not penalty_factor >= 0:
        raise ValueError(f"overlong penalty_factor must be >= 0, got {penalty_factor}")
    start = max_len - buffer_len
    if length <= start:
        return 0.0
    if length >= max_len:
        return -float(penalty_factor)
    return -(length - start) / buffer_len * penalty_factor
