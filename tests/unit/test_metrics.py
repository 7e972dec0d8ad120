from math import comb

import pytest

from rl.metrics import (
    bootstrap_ci,
    canonical_answer,
    correct_counts,
    maj_at_k,
    mean_at_k,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_per_problem,
    summarize_samples,
)


@pytest.mark.parametrize("n,c,k,expected", [(5, 2, 2, 0.7), (5, 2, 1, 0.4), (5, 0, 3, 0.0), (4, 1, 4, 1.0),
                                            (16, 4, 8, 0.961538)])
def test_pass_at_k_reference_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n,c,k,expected", [
    (1, 0, 1, 0.0), (1, 1, 1, 1.0),  # one sample
    (4, 0, 4, 0.0), (4, 4, 1, 1.0),  # none / all correct: exactly 0 / 1
    (4, 1, 4, 1.0), (4, 3, 2, 1.0),  # n - c < k: some correct sample is in every k-subset
    (2, 1, 1, 0.5), (3, 1, 2, 2 / 3), (6, 2, 3, 0.8),  # 1 - C(n-c,k)/C(n,k): 1 - 1/2, 1 - 1/3, 1 - 4/20
])
def test_pass_at_k_edges(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_gdro_classifier_uses_the_same_pass_at_k():
    import rl.algorithms.gdro as gdro

    assert gdro.pass_at_k is pass_at_k


def test_product_formula_equals_combinatorial():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    assert 0.0 < pass_at_k(10_000, 3, 50) < 1.0


def test_pass_at_k_rejects_bad_args():
    for args in [(4, 5, 1), (4, 1, 5), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_curve_from_matrix_and_counts():
    matrix = [[True, False, False, False], [True, True, True, True]]
    counts = correct_counts(matrix)
    assert counts == [(4, 1), (4, 4)]
    curve = pass_at_k_curve(counts)
    assert list(curve) == [1, 2, 3, 4]
    assert curve[1] == pytest.approx((0.25 + 1.0) / 2)
    assert curve[2] == pytest.approx((0.5 + 1.0) / 2)
    assert curve[4] == pytest.approx(1.0)
    assert pass_at_k_curve(counts, ks=[2]) == {2: pytest.approx(0.75)}
    assert pass_at_k_per_problem(counts, 2).tolist() == pytest.approx([0.5, 1.0])


def test_curve_rejects_k_above_smallest_n():
    with pytest.raises(ValueError, match="k <= 2"):
        pass_at_k_curve([(4, 1), (2, 1)], ks=[3])


def test_mean_at_k():
    assert mean_at_k([True, False, True, True]) == 0.75
    assert mean_at_k([True, False, True, True], k=2) == 0.5


def _num_equal(a, b):
    return float(a) == float(b)


def test_maj_at_3_after_canonicalization():
    answers = ["12", "12.0", "7"]
    assert maj_at_k(answers, lambda a: float(a) == 12, 3, equivalent=_num_equal) == 1.0


def test_maj_at_3_raw_strings_tie_rule():
    # raw string voting: "12", "12.0", "7" each have one vote
    answers = ["12", "12.0", "7"]
    is_correct = [True, True, False]
    assert maj_at_k(answers, is_correct, 3, tie_rule="earliest") == 1.0  # "12" voted first
    assert maj_at_k(answers, is_correct, 3, tie_rule="wrong") == 0.0
    assert maj_at_k(["7", "12", "12.0"], [False, True, True], 3, tie_rule="earliest") == 0.0


def test_maj_excludes_unparsable_and_uses_first_k():
    answers = [None, None, "3", "5", "5", "5"]
    assert maj_at_k(answers, lambda a: a == "3", 3) == 1.0  # None excluded: the only vote is "3"
    assert maj_at_k(answers, lambda a: a == "3", 6) == 0.0  # "5" wins 3-1
    assert maj_at_k([None, None], [False, False], 2) == 0.0


def test_bootstrap_ci():
    values = [0.0, 1.0] * 50
    low, high = bootstrap_ci(values, num_resamples=500, seed=0)
    assert low < 0.5 < high and 0.35 < low and high < 0.65
    assert bootstrap_ci(values, num_resamples=500, seed=0) == (low, high)  # reproducible
    assert bootstrap_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_metrics_module_does_not_use_torch():
    import ast
    import inspect

    import rl.metrics

    tree = ast.parse(inspect.getsource(rl.metrics))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported


def test_pass_at_k_full_curve_n5_c2():
    # 1 - C(3,k)/C(5,k): k=1: 1-3/5, k=2: 1-3/10, k=3: 1-1/10, k=4,5: n-c < k -> 1
    assert [pass_at_k(5, 2, k) for k in range(1, 6)] == pytest.approx([0.4, 0.7, 0.9, 1.0, 1.0])


@pytest.mark.parametrize("n", [1, 4, 16])
def test_pass_at_k_edges_none_and_all_correct(n):
    assert all(pass_at_k(n, 0, k) == 0.0 for k in range(1, n + 1))
    assert all(pass_at_k(n, n, k) == 1.0 for k in range(1, n + 1))


def test_pass_at_k_rejects_k_above_n_with_clear_message():
    with pytest.raises(ValueError, match=r"1 <= k <= n.*n=4, c=1, k=8"):
        pass_at_k(4, 1, 8)


def test_maj_tie_between_two_clusters():
    # two votes each for "3" and "4" among k=4; "4" voted first
    answers = ["4", "3", "3", "4", "5"]
    flags = [False, True, True, False, False]
    assert maj_at_k(answers, flags, 4, tie_rule="earliest") == 0.0
    assert maj_at_k(answers, flags, 4, tie_rule="wrong") == 0.0
    assert maj_at_k(["3", "4", "4", "3"], [True, False, False, True], 4, tie_rule="earliest") == 1.0
    assert maj_at_k(["3", "4", "4", "3"], [True, False, False, True], 4, tie_rule="wrong") == 0.0
    # k=3 breaks the tie: "3" has two votes
    assert maj_at_k(answers, flags, 3, tie_rule="wrong") == 1.0


def test_canonical_answer_groups_spellings():
    assert canonical_answer(" 12.0 ") == canonical_answer("12") == "12"
    assert canonical_answer("\\dfrac{1}{2}") == canonical_answer("\\frac{1}{2}")
    assert canonical_answer("\\left( 3, \\pi \\right)") == "(3,\\pi)"
    assert canonical_answer("  ") is None and canonical_answer(None) is None
    assert canonical_answer("1.50") == "1.5" and canonical_answer("-2.") == "-2"


def test_summarize_samples_hand_computed():
    correct = [[True, True, False, False, False], [False] * 5, [True] * 5]
    answers = [["7", "7.0", "3", "3", "3"], [None, "1", "2", "2", None], ["5"] * 5]
    s = summarize_samples(correct, answers, maj_ks=[1, 5], num_resamples=200)
    assert s.num_problems == 3 and s.num_samples == 5
    assert list(s.pass_at_k) == [1, 2, 3, 4, 5]
    assert s.pass_at_k[1].value == pytest.approx((0.4 + 0 + 1) / 3)
    assert s.pass_at_k[2].value == pytest.approx((0.7 + 0 + 1) / 3)
    assert s.maj_at_k[1].value == pytest.approx(2 / 3)  # first answers: 7 (right), None, 5 (right)
    assert s.maj_at_k[5].value == pytest.approx(1 / 3)  # "3" wins 3-2 on problem 1
    assert s.mean_at_n.value == pytest.approx(7 / 15)
    for est in list(s.pass_at_k.values()) + list(s.maj_at_k.values()) + [s.mean_at_n]:
        assert est.ci_low <= est.value <= est.ci_high


def test_summarize_samples_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same number of samples"):
        summarize_samples([[True], [True, False]])
    with pytest.raises(ValueError, match="maj@k needs 1 <= k <= n=2"):
        summarize_samples([[True, False]], [["1", "2"]], maj_ks=[4])


def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_problems():
    import numpy as np

    rng = np.random.default_rng(1)
    widths = []
    for num_problems in (20, 80, 320, 1280):
        values = rng.integers(0, 2, size=num_problems).astype(float)
        low, high = bootstrap_ci(values, num_resamples=1000, seed=0)
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert all(a > b for a, b in zip(widths, widths[1:])), widths
    assert widths[-1] < widths[0] / 4  # ~1/sqrt(P): 64x the problems, ~8x narrower
