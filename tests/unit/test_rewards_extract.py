"""Answer extraction: boxed/fbox with nesting, several boxed answers, ####, 'answer is', <think>."""

from __future__ import annotations

import pytest

from rewards.extract import MAX_SCAN_CHARS, extract_answer, find_boxed, match_brace, sanitize, strip_thinking


@pytest.mark.parametrize(
    ("response", "answer", "method"),
    [
        ("so \\boxed{5}.", "5", "boxed"),
        ("so \\fbox{5}.", "5", "boxed"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", "boxed"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "boxed"),
        ("\\boxed{1} then \\boxed{2}", "2", "boxed"),
        ("\\boxed{1} and \\boxed{2}", "1, 2", "boxed"),
        ("$\\boxed{1}$, $\\boxed{2}$ or $\\boxed{3}$", "1, 2, 3", "boxed"),
        ("\\boxed{7} but \\boxed{8", "7", "boxed"),
        ("$\\boxed 5$", "5", "boxed"),
        ("step\n#### 1,234\n", "1,234", "hash"),
        ("The answer is $\\frac{1}{2}$. I hope", "\\frac{1}{2}", "answer_phrase"),
        ("**Final Answer:** 42", "42", "answer_phrase"),
        ("the answer is 3.5.", "3.5", "answer_phrase"),
        ("Answer: (1, 2)\nDone", "(1, 2)", "answer_phrase"),
        ("So the answer is $\\$36$.", "\\$36", "answer_phrase"),
        ("answer is $$\\frac12$$ ok", "\\frac12", "answer_phrase"),
        ("answer: \\(x+1\\) yes", "x+1", "answer_phrase"),
        ("nothing here", None, "none"),
        ("", None, "none"),
    ],
)
def test_extract_answer(response: str, answer: str | None, method: str) -> None:
    extraction = extract_answer(response)
    assert (extraction.answer, extraction.method) == (answer, method)


def test_think_block_is_skipped() -> None:
    extraction = extract_answer("<think>\\boxed{1}</think>\\boxed{2}")
    assert extraction.answer == "2" and not extraction.unclosed_think
    assert extract_answer("<think>\\boxed{1}</think> no answer").answer is None


def test_unclosed_think_is_flagged() -> None:
    extraction = extract_answer("<think>working \\boxed{3}")
    assert extraction.answer == "3" and extraction.unclosed_think
    text, unclosed = strip_thinking("a</think>b<think>c")
    assert (text, unclosed) == ("b<think>c", True)


def test_match_brace_skips_escaped_braces_and_gives_up_when_unclosed() -> None:
    text = "{a\\}{b}}"
    assert match_brace(text, 0) == len(text) - 1
    assert match_brace("{" * 10_000, 0) is None


def test_deep_nesting_and_huge_input_are_linear() -> None:
    nested = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    assert extract_answer(nested).answer is None  # longer than any real answer: treated as unclosed
    huge = "x" * 1_000_000 + "\\boxed{9}"
    extraction = extract_answer(huge)
    assert extraction.answer == "9" and len(extraction.final_text) == MAX_SCAN_CHARS
    assert len(find_boxed("\\boxed{" * 100_000)) == 0


def test_sanitize_drops_nul_and_surrogates() -> None:
    assert sanitize("a\x00b") == "ab"
    assert sanitize("a\ud800b") == "a?b"
    assert extract_answer("\x00\\boxed{4\x00}\udcff").answer == "4"
