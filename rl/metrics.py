"""Evaluation statistics: unbiased pass@k, mean@k, maj@k and bootstrap confidence intervals.

Pure functions over plain Python / numpy values (no torch), shared by training-time validation and
offline eval. Formulas: ``docs/algorithms.md`` "pass@k, mean@k, maj@k".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples of which ``c`` are correct (Chen et al. 2021,
    arXiv 2107.03374): 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def correct_counts(correct: Sequence[Sequence[bool]] | np.ndarray) -> list[tuple[int, int]]:
    """Per-problem (n, c) from per-sample correctness flags, one row per problem (rows may differ in length)."""
    return [(len(row), int(np.count_nonzero(np.asarray(row, dtype=bool)))) for row in correct]


def pass_at_k_per_problem(counts: Sequence[tuple[int, int]], k: int) -> np.ndarray:
    """[P] pass@k of each problem from its (n, c); feed to ``bootstrap_ci`` for an interval."""
    return np.array([pass_at_k(n, c, k) for n, c in counts], dtype=np.float64)


def pass_at_k_curve(counts: Sequence[tuple[int, int]], ks: Sequence[int] | None = None) -> dict[int, float]:
    """Benchmark pass@k (mean over problems) for each k, from per-problem (n, c) pairs.

    ``ks`` defaults to 1..min(n) over problems; every k must be <= each problem's n (a problem with
    fewer samples than k has no unbiased estimate). For a correctness matrix use
    ``pass_at_k_curve(correct_counts(matrix))``.
    """
    if not counts:
        raise ValueError("pass_at_k_curve needs at least one problem")
    min_n = min(n for n, _ in counts)
    ks = list(range(1, min_n + 1)) if ks is None else list(ks)
    if any(k > min_n for k in ks):
        raise ValueError(f"k up to {max(ks)} requested but some problem has only {min_n} samples; use k <= {min_n}")
    return {k: float(pass_at_k_per_problem(counts, k).mean()) for k in ks}


def mean_at_k(correct: Sequence[bool], k: int | None = None) -> float:
    """mean@k (avg@k) of one problem: the fraction correct among its first ``k`` samples (all if None);
    an unbiased pass@1 estimate."""
    flags = list(correct) if k is None else list(correct)[:k]
    if not flags or (k is not None and len(flags) < k):
        raise ValueError(f"mean@k needs k <= number of samples ({len(list(correct))}), got k={k}")
    return float(np.mean(np.asarray(flags, dtype=np.float64)))


def maj_at_k(
    answers: Sequence[str | None],
    is_correct: Sequence[bool] | Callable[[str], bool],
    k: int,
    *,
    equivalent: Callable[[str, str], bool] | None = None,
    tie_rule: Literal["earliest", "wrong"] = "earliest",
) -> float:
    """maj@k (cons@k) of one problem: 1.0 if the most frequent answer among the first ``k`` samples is correct.

    answers:    extracted answer per sample; None (nothing parsed) is excluded from the vote.
    is_correct: per-sample correctness flags (aligned with ``answers``), or a callable judging an answer
                against the reference. The winning cluster is judged by its earliest member.
    equivalent: groups answers into vote clusters (e.g. math-verify equivalence); each answer joins the
                first cluster whose earliest member it is equivalent to. Default: exact string equality
                (pass canonicalized strings).
    tie_rule:   ``"earliest"``: among tied clusters, the one whose first vote came earliest wins;
                ``"wrong"``: a tie for the top count scores 0.

    No parsable answer among the first k scores 0.
    """
    if k < 1 or k > len(answers):
        raise ValueError(f"maj@k needs 1 <= k <= number of answers ({len(answers)}), got k={k}")
    if tie_rule not in ("earliest", "wrong"):
        raise ValueError(f"unknown tie_rule {tie_rule!r}; valid: earliest, wrong")
    same = equivalent or (lambda a, b: a == b)
    clusters: list[list[int]] = []  # sample indices; clusters in order of first vote
    for i, a in enumerate(answers[:k]):
        if a is None:
            continue
        for members in clusters:
            if same(answers[members[0]], a):
                members.append(i)
                break
        else:
            clusters.append([i])
    if not clusters:
        return 0.0
    top = max(len(m) for m in clusters)
    leaders = [m for m in clusters if len(m) == top]
    if len(leaders) > 1 and tie_rule == "wrong":
        return 0.0
    rep = leaders[0][0]  # earliest first vote among the leaders
    ok = is_correct(answers[rep]) if callable(is_correct) else is_correct[rep]
    return 1.0 if ok else 0.0


def bootstrap_ci(
    per_problem_values: Sequence[float] | np.ndarray,
    num_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) confidence interval of the mean over problems: (low, high).

    Problems are resampled with replacement ``num_resamples`` times with a seeded generator, so the
    interval is reproducible.
    """
    values = np.asarray(per_problem_values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D sequence of per-problem values, got shape {values.shape}")
    if not 0.0 < alpha < 1.0 or num_resamples < 1:
        raise ValueError(f"need 0 < alpha < 1 and num_resamples >= 1, got alpha={alpha}, num_resamples={num_resamples}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(num_resamples, values.size))
    means = values[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def canonical_answer(answer: str | None) -> str | None:
    """A light normal form of an extracted answer for majority voting (not for grading): drops ``$``, spaces,
    ``\\left``/``\\right``, ``\\!``, a trailing period, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, and the zeros of
    ``12.0``. Empty answers become None (excluded from the vote)."""
    if answer is None:
        return None
    s = answer.strip().strip("$").rstrip(".")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")):
        s = s.replace(old, new)
    s = "".join(s.split())
    if s.replace(",", "").lstrip("-").replace(".", "", 1).isdigit() and "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or None


@dataclass(frozen=True)
class Estimate:
    """A benchmark-level mean over problems with its percentile-bootstrap interval over problems."""

    value: float
    ci_low: float
    ci_high: float


@dataclass
class SampleSummary:
    """Statistics of one set of problems with ``n`` graded samples each.

    pass_at_k: k -> unbiased pass@k, for every k in 1..n (the curve).
    maj_at_k:  k -> maj@k over each problem's first k samples (votes on ``canonical_answer``; ties go to the
               earliest answer), for the requested ks.
    mean_at_n: fraction of all samples that are correct (mean@n, an unbiased pass@1).
    """

    num_problems: int
    num_samples: int
    pass_at_k: dict[int, Estimate]
    maj_at_k: dict[int, Estimate]
    mean_at_n: Estimate


def _estimate(per_problem: np.ndarray, num_resamples: int, alpha: float, seed: int) -> Estimate:
    low, high = bootstrap_ci(per_problem, num_resamples=num_resamples, alpha=alpha, seed=seed)
    return Estimate(float(per_problem.mean()), low, high)


def summarize_samples(
    correct: Sequence[Sequence[bool]],
    answers: Sequence[Sequence[str | None]] | None = None,
    maj_ks: Sequence[int] = (),
    *,
    num_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> SampleSummary:
    """pass@k for k = 1..n, maj@k for ``maj_ks`` and mean@n, each with a bootstrap CI over problems.

    correct: [P][n] verifier verdicts, the same n for every problem.
    answers: [P][n] extracted answers (None: nothing parsed); needed when ``maj_ks`` is not empty.
    """
    counts = correct_counts(correct)
    if not counts:
        raise ValueError("summarize_samples needs at least one problem")
    sizes = {n for n, _ in counts}
    if len(sizes) != 1:
        raise ValueError(f"every problem needs the same number of samples, got sizes {sorted(sizes)}")
    n = sizes.pop()
    if n < 1:
        raise ValueError("every problem needs at least one sample")
    bad = [k for k in maj_ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"maj@k needs 1 <= k <= n={n}, got k={bad}")
    if maj_ks and (answers is None or len(answers) != len(counts)):
        raise ValueError("maj@k needs the extracted answers of every problem")
    passes = {k: _estimate(pass_at_k_per_problem(counts, k), num_resamples, alpha, seed) for k in range(1, n + 1)}
    majs = {}
    for k in maj_ks:
        votes = [[canonical_answer(a) for a in row] for row in answers]  # type: ignore[union-attr]
        per = np.array([maj_at_k(v, list(c), k) for v, c in zip(votes, correct)], dtype=np.float64)
        majs[k] = _estimate(per, num_resamples, alpha, seed)
    means = np.array([c / n for _, c in counts], dtype=np.float64)
    return SampleSummary(len(counts), n, passes, majs, _estimate(means, num_resamples, alpha, seed))
