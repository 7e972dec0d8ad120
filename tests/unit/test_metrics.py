from math import comb

import pytest

from rl.metrics import (
    bootstrap_ci,
    correct_counts,
    maj_at_k,
    mean_at_k,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_per_problem,
)


@pytest.mark.parametrize("n,c,k,expected", [(5, 2, 2, 0.7), (5, 2, 1, 0.4), (5, 0, 3, 0.0), (4, 1, 4, 1.0),
                                            (16, 4, 8, 0.961538)])
def test_pass_at_k_reference_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-6)


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
