"""Equivalence table for the math verifier: (response, gold, expected verdict), graded in-process.

Each row is a case a real grader must get right; near-misses must be graded incorrect.
"""

from __future__ import annotations

import pytest

from rewards.math_verifier import grade_math


def B(answer: str) -> str:
    """A model-style response ending in a boxed answer."""
    return f"Let's solve it step by step.\n... so we get the result.\n\nThe final answer is $\\boxed{{{answer}}}$."


CASES: list[tuple[str, str, str, bool]] = [
    # id, response, gold, expected
    # --- fractions and decimals
    ("frac-vs-decimal", B("\\frac{1}{2}"), "0.5", True),
    ("decimal-vs-frac", B("0.5"), "\\frac{1}{2}", True),
    ("dfrac", B("\\dfrac{3}{4}"), "\\frac{3}{4}", True),
    ("tfrac-vs-decimal", B("\\tfrac{3}{4}"), "0.75", True),
    ("slash-vs-frac-shorthand", B("3/4"), "\\frac34", True),
    ("unreduced-frac", B("\\frac{2}{4}"), "\\frac{1}{2}", True),
    ("six-decimals-of-third", B("0.333333"), "\\frac13", True),
    ("two-decimals-of-third", B("0.33"), "\\frac13", False),
    ("negative-frac", B("-\\frac{1}{2}"), "-0.5", True),
    ("negative-numerator", B("\\frac{-1}{2}"), "-\\frac{1}{2}", True),
    ("different-frac", B("\\frac{1}{2}"), "\\frac{1}{3}", False),
    ("decimal-vs-improper", B("1.5"), "\\frac{3}{2}", True),
    ("bare-leading-dot", B(".5"), "0.5", True),
    ("trailing-zero-decimal", B("2.50"), "2.5", True),
    ("frac-of-sqrt-style-gold", B("\\frac{7}{2}"), "3.5", True),
    ("negative-decimal-mismatch", B("-0.25"), "0.25", False),
    # --- leading zeros, trailing .0
    ("leading-zero-response", B("025"), "25", True),
    ("leading-zero-gold", B("25"), "025", True),
    ("double-leading-zero", B("007"), "7", True),
    ("int-vs-float-gold", B("27"), "27.0", True),
    ("float-vs-int-gold", B("27.0"), "27", True),
    ("float-two-zeros", B("27.00"), "27", True),
    ("near-int", B("27.01"), "27", False),
    ("shifted-digits", B("250"), "025", False),
    ("zero", B("0"), "0", True),
    ("negative-zero", B("-0"), "0", True),
    ("amc-float-gold", B("36"), "36.0", True),
    ("aime-three-digit", B("204"), "204", True),
    # --- thousands separators
    ("comma-thousands-response", B("1,000"), "1000", True),
    ("comma-thousands-gold", B("1000"), "1,000", True),
    ("latex-comma-thousands", B("1{,}000"), "1000", True),
    ("millions", B("12,345,678"), "12345678", True),
    ("hash-with-commas", "The total is\n#### 1,234", "1234", True),
    ("thousands-mismatch", B("1,001"), "1000", False),
    # --- percent
    ("percent-vs-number", B("50\\%"), "50", True),
    ("number-vs-percent", B("50"), "50\\%", True),
    ("fraction-vs-percent", B("0.5"), "50\\%", True),
    ("percent-vs-fraction", B("50\\%"), "0.5", True),
    ("percent-mismatch", B("25\\%"), "50\\%", False),
    ("decimal-percent", B("12.5\\%"), "12.5", True),
    ("plain-percent-text", "So the increase is 40%.\nThe answer is 40%.", "40", True),
    ("percent-near-miss", B("25\\%"), "0.5", False),
    # --- intervals
    ("interval-same", B("[2,5)"), "[2,5)", True),
    ("interval-spacing", B("[2, 5)"), "[2,5)", True),
    ("interval-wrong-ends", B("(2,5]"), "[2,5)", False),
    ("interval-infinite", B("(-\\infty, 3)"), "(-\\infty,3)", True),
    ("interval-closed-vs-open", B("(-\\infty, 3]"), "(-\\infty,3)", False),
    ("interval-union", B("(-\\infty,1)\\cup(2,\\infty)"), "(-\\infty, 1) \\cup (2, \\infty)", True),
    ("interval-left-right", B("\\left[0, 1\\right]"), "[0,1]", True),
    ("interval-different-end", B("[0,1]"), "[0,2]", False),
    ("interval-x-in", B("x \\in [0, 1]"), "[0,1]", True),
    ("interval-union-mismatch", B("(-\\infty,1)\\cup(3,\\infty)"), "(-\\infty, 1) \\cup (2, \\infty)", False),
    # --- sets and lists of roots
    ("set-order", B("\\{1,2,3\\}"), "\\{3,2,1\\}", True),
    ("set-vs-list", B("1, 2, 3"), "\\{1,2,3\\}", True),
    ("set-missing-element", B("\\{1,2\\}"), "\\{1,2,3\\}", False),
    ("roots-order", B("2, 3"), "3, 2", True),
    ("roots-negative", B("-2, 3"), "3, -2", True),
    ("roots-one-wrong", B("-2, 4"), "3, -2", False),
    ("set-different", B("\\{1,2\\}"), "\\{1,3\\}", False),
    ("empty-set", B("\\emptyset"), "\\emptyset", True),
    ("roots-as-x-equals", B("x = 2, 3"), "2, 3", True),
    ("roots-fractions", B("\\frac{1}{2}, -1"), "-1, 0.5", True),
    # --- tuples and points
    ("pair-same", B("(1, 2)"), "(1,2)", True),
    ("pair-swapped", B("(2, 1)"), "(1,2)", False),
    ("polar-point", B("\\left( 3, \\frac{\\pi}{2} \\right)"), "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("polar-point-no-left-right", B("(3, \\frac{\\pi}{2})"), "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("polar-point-wrong-angle", B("(3, \\pi)"), "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("triple", B("(1,2,3)"), "(1,2,3)", True),
    ("triple-permuted", B("(1,3,2)"), "(1,2,3)", False),
    ("pair-decimal-vs-frac", B("(0.5, 1)"), "(\\frac12, 1)", True),
    ("pair-vs-interval-closed", B("(1,2)"), "[1,2]", False),
    ("triple-negative", B("(-1, 0, 2)"), "(-1,0,2)", True),
    # --- matrices and vectors
    ("column-vector-spacing", B("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("pmatrix-vs-bmatrix", B("\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}"),
     "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", True),
    ("matrix-frac-vs-decimal", B("\\begin{pmatrix} 1/2 \\\\ 3 \\end{pmatrix}"),
     "\\begin{pmatrix} 0.5 \\\\ 3 \\end{pmatrix}", True),
    ("matrix-different", B("\\begin{pmatrix} 1 & 2 \\\\ 3 & 5 \\end{pmatrix}"),
     "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", False),
    ("vector-swapped", B("\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"), "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    ("vector-negative-entries", B("\\begin{pmatrix} -1 \\\\ \\frac{3}{2} \\end{pmatrix}"),
     "\\begin{pmatrix} -1 \\\\ 1.5 \\end{pmatrix}", True),
    # --- units and currency
    ("unit-cm-response", B("5 \\text{ cm}"), "5", True),
    ("unit-cm-gold", B("5"), "5 \\text{ cm}", True),
    ("unit-squared", B("5\\text{ cm}^2"), "5", True),
    ("unit-inches", B("12 \\text{ inches}"), "12", True),
    ("dollar-sign", B("\\$18"), "18", True),
    ("dollars-word", B("18 \\text{ dollars}"), "18", True),
    ("dollar-cents", B("\\$18.00"), "18", True),
    ("unit-mismatch-number", B("6 \\text{ cm}"), "5 \\text{ cm}", False),
    ("unit-mbox", B("3\\mbox{ meters}"), "3", True),
    ("unit-mathrm", B("10 \\mathrm{~m}"), "10", True),
    ("unit-minutes", B("204 \\text{ minutes}"), "204", True),
    ("unit-wrong-value", B("\\$17"), "18", False),
    # --- degrees
    ("degree-response", B("30^\\circ"), "30", True),
    ("degree-gold", B("30"), "30^\\circ", True),
    ("degree-braced", B("30^{\\circ}"), "30^\\circ", True),
    ("degree-symbol", B("30°"), "30", True),
    ("degree-mismatch", B("45^\\circ"), "30^\\circ", False),
    ("degree-decimal", B("22.5^\\circ"), "22.5", True),
    # --- scientific notation
    ("sci-to-int", B("1.5 \\times 10^{3}"), "1500", True),
    ("int-to-sci", B("1500"), "1.5\\times10^3", True),
    ("sci-cdot", B("3 \\cdot 10^{8}"), "300000000", True),
    ("sci-same", B("6.02 \\times 10^{23}"), "6.02\\times 10^{23}", True),
    ("sci-exponent-off", B("6.02 \\times 10^{22}"), "6.02\\times 10^{23}", False),
    ("sci-negative-exponent", B("2.5 \\times 10^{-3}"), "0.0025", True),
    ("sci-mantissa-off", B("2.6 \\times 10^{-3}"), "0.0025", False),
    # --- square roots and radicals
    ("sqrt-simplified", B("2\\sqrt{2}"), "\\sqrt{8}", True),
    ("sqrt-unsimplified", B("\\sqrt{8}"), "2\\sqrt2", True),
    ("sqrt-over-2", B("\\frac{\\sqrt{3}}{2}"), "\\frac{1}{2}\\sqrt{3}", True),
    ("rationalized", B("\\frac{1}{\\sqrt{2}}"), "\\frac{\\sqrt{2}}{2}", True),
    ("sqrt-different", B("\\sqrt{2}"), "\\sqrt{3}", False),
    ("sqrt-45", B("3\\sqrt{5}"), "\\sqrt{45}", True),
    ("cube-root", B("\\sqrt[3]{8}"), "2", True),
    ("sqrt-sum-order", B("1+\\sqrt{2}"), "\\sqrt{2}+1", True),
    ("sqrt-sign", B("1-\\sqrt{2}"), "1+\\sqrt{2}", False),
    ("sqrt-slash", B("\\sqrt{2}/2"), "\\frac{\\sqrt2}{2}", True),
    ("sqrt-coefficients-swapped", B("2\\sqrt{3}"), "3\\sqrt{2}", False),
    # --- expressions, equations, constants
    ("expanded-square", B("x^2+2x+1"), "(x+1)^2", True),
    ("commuted-sum", B("2x+1"), "1+2x", True),
    ("sign-flip", B("2x-1"), "2x+1", False),
    ("symbolic-difference", B("p - q"), "p-q", True),
    ("symbolic-difference-swapped", B("q - p"), "p-q", False),
    ("pi", B("\\pi"), "\\pi", True),
    ("two-pi", B("2\\pi"), "\\pi", False),
    ("pi-over-2", B("\\frac{\\pi}{2}"), "\\pi/2", True),
    ("line-equation", B("y = 2x + 3"), "y=2x+3", True),
    ("rhs-of-gold-equation", B("2x + 3"), "y = 2x+3", True),
    ("assignment-response", B("x = 5"), "5", True),
    ("assignment-gold", B("5"), "x=5", True),
    ("assignment-wrong", B("x=5"), "6", False),
    ("complex", B("1+2i"), "1+2i", True),
    ("complex-conjugate", B("1-2i"), "1+2i", False),
    ("power-vs-value", B("2^{10}"), "1024", True),
    ("binomial", B("\\binom{5}{2}"), "10", True),
    ("factorial", B("5!"), "120", True),
    ("exp-neg", B("e^{-1}"), "\\frac{1}{e}", True),
    ("power-near-miss", B("5^2"), "10", False),
    # --- multiple-choice letters and text answers
    ("choice-letter", B("C"), "\\text{(C)}", True),
    ("choice-paren", B("(C)"), "\\text{(C)}", True),
    ("choice-text-vs-letter", B("\\text{(C)}"), "C", True),
    ("choice-textbf", B("\\textbf{(C)}"), "\\text{(C)}", True),
    ("choice-wrong", B("B"), "\\text{(C)}", False),
    ("choice-lowercase", B("c"), "\\text{(C)}", True),
    ("text-name", B("\\text{Devon}"), "\\text{Devon}", True),
    ("text-day-wrong", B("\\text{Monday}"), "\\text{Tuesday}", False),
    ("text-parity-wrong", B("\\text{even}"), "\\text{odd}", False),
    ("text-parity", B("\\text{odd}"), "\\text{odd}", True),
    # --- several boxed answers
    ("last-boxed-wins", "First I got \\boxed{3}, but wait, that's wrong. Final: \\boxed{5}", "5", True),
    ("earlier-boxed-ignored", "First I got \\boxed{3}, but wait, that's wrong. Final: \\boxed{5}", "3", False),
    ("adjacent-boxed-roots", "The roots are \\boxed{2} and \\boxed{3}.", "2, 3", True),
    ("adjacent-boxed-hedge", "The roots are \\boxed{2} and \\boxed{3}.", "2", False),
    ("adjacent-boxed-dollars", "So $\\boxed{2}$, $\\boxed{-3}$", "-3, 2", True),
    ("nested-boxed", "\\boxed{\\boxed{5}}", "5", True),
    ("boxed-quad-separated", "$\\boxed{2} \\quad \\boxed{3}$", "2,3", True),
    ("nested-braces-in-boxed", "\\boxed{\\frac{\\sqrt{2}}{\\left(1+\\frac{1}{2}\\right)}}", "\\frac{2\\sqrt{2}}{3}", True),
    ("unclosed-last-boxed-uses-earlier", "so \\boxed{7}. Double-check: \\boxed{7", "7", True),
    # --- <think> blocks
    ("think-wrong-then-final", "<think>maybe \\boxed{3}?</think> The answer is \\boxed{5}.", "5", True),
    ("think-answer-ignored", "<think>maybe \\boxed{3}?</think> The answer is \\boxed{5}.", "3", False),
    ("think-then-phrase", "<think>I think it's 7</think>\n\nFinal answer: 12", "12", True),
    ("think-only-no-final", "<think>so it is \\boxed{7}</think>", "7", False),
    ("unclosed-think-graded", "<think> long reasoning ... \\boxed{7}", "7", True),
    ("two-think-blocks", "<think>\\boxed{1}</think><think>\\boxed{2}</think>\\boxed{3}", "3", True),
    ("template-opened-think", "reasoning ... 4 it is.</think>\n\\boxed{4}", "4", True),
    ("think-uppercase-tags", "<THINK>\\boxed{9}</THINK> so \\boxed{8}", "8", True),
    ("thinking-tag", "<thinking>\\boxed{9}</thinking> so \\boxed{8}", "9", False),
    # --- \fbox and bare \boxed
    ("fbox", "Thus \\fbox{42}.", "42", True),
    ("fbox-frac", "Thus $\\fbox{\\frac{1}{2}}$", "0.5", True),
    ("boxed-without-braces", "Thus $\\boxed 5$.", "5", True),
    ("fbox-wrong", "Thus \\fbox{41}.", "42", False),
    # --- other answer formats
    ("gsm8k-hash", "She earns 9 * 2 = 18 dollars.\n#### 18", "18", True),
    ("answer-is", "Adding them up, the answer is 72.", "72", True),
    ("final-answer-latex-hope", "The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", True),
    ("markdown-final-answer", "**Final Answer:** 42", "42", True),
    ("answer-colon-tuple", "Answer: (1, 2)", "(1,2)", True),
    ("unanchored-last-number", "So she makes 18 dollars every day.", "18", True),
    ("no-answer", "No idea.", "5", False),
    ("empty-response", "", "5", False),
    ("answer-is-wrong", "Adding them up, the answer is 71.", "72", False),
    ("answer-is-escaped-dollar", "</think>So the answer is $\\$36$.", "\\$36", True),
    ("answer-is-display-math", "Hence the answer is $$\\frac{5}{2}$$", "2.5", True),
    # --- near misses that must be incorrect
    ("half-near-miss", B("0.499"), "\\frac12", False),
    ("fourth-decimal", B("0.5001"), "0.5", False),
    ("order-of-magnitude", B("100"), "10", False),
    ("sign", B("-5"), "5", False),
    ("reciprocal", B("\\frac{1}{2}"), "2", False),
    ("power-mismatch", B("x^2"), "x^3", False),
    ("list-vs-number", B("1,2"), "12", False),
    ("pi-approx", B("3.14"), "\\pi", False),
    ("infinity-sign", B("\\infty"), "-\\infty", False),
    ("decimal-off", B("27.5"), "27", False),
    ("extra-root", B("1, 2, 3"), "1, 2", False),
    ("variable-name", B("y + 1"), "x + 1", False),
]


@pytest.mark.parametrize(("response", "gold", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_equivalence_table(response: str, gold: str, expected: bool) -> None:
    result = grade_math("", response, gold, {})
    assert result.correct is expected, result
    assert result.score == (1.0 if expected else 0.0)


def test_table_is_big_and_ids_unique() -> None:
    assert len(CASES) >= 150
    assert len({c[0] for c in CASES}) == len(CASES)
