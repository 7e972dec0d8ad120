"""The math verifier: extract the final answer, parse it and the gold with math-verify, check equivalence.

math-verify's own timeout uses ``signal.alarm``, which only works on a process's main thread (elsewhere it
raises, or the caller swallows the error and returns 0). We always call it with its timeout disabled
(``parsing_timeout=None``, ``timeout_seconds=None``); :class:`rewards.pool.RewardPool` enforces the wall-clock
limit from outside by killing the worker process. So :func:`grade_math` itself may run for a long time on
pathological input: call it in-process only on trusted data (tests, offline analysis).

math-verify (and sympy) are imported on first use so that the driver process can import ``rewards`` cheaply.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from rl.types import RewardResult
from rewards.base import failed_result, register_reward
from rewards.extract import MAX_ANSWER_CHARS, extract_answer

# Where no anchored answer exists, math-verify looks for the last LaTeX/number in this many final chars.
_FALLBACK_TAIL_CHARS = 1_000


@dataclass(frozen=True)
class MathVerifyConfig:
    """Options of the ``math_verify`` reward (its ``RewardSpec.kwargs``).

    float_rounding:      decimal places kept when a float is compared with a number (math-verify's default).
    numeric_precision:   significant digits for numeric evaluation of symbolic differences.
    strict:              variables must match by name; sets and tuples are not interchangeable.
    unanchored_fallback: with no ``\\boxed``/``####``/"answer is" in the response, grade the last LaTeX
                         expression or number of the response (math-verify's behaviour). False: parse_fail.
    unclosed_think:      ``"grade"`` grades a response whose ``<think>`` never closes like any other;
                         ``"fail"`` makes it a parse failure (the model never left its scratchpad).
    correct_score:       score of a correct answer.
    incorrect_score:     score of a wrong answer (failures always score 0).
    """

    float_rounding: int = 6
    numeric_precision: int = 15
    strict: bool = True
    unanchored_fallback: bool = True
    unclosed_think: str = "grade"
    correct_score: float = 1.0
    incorrect_score: float = 0.0

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "MathVerifyConfig":
        """Build from ``RewardSpec.kwargs``; unknown keys are a ValueError listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"math_verify: unknown option(s) {unknown}; valid options are {valid}")
        config = cls(**kwargs)
        if config.unclosed_think not in ("grade", "fail"):
            raise ValueError(f"math_verify: unclosed_think must be 'grade' or 'fail', got {config.unclosed_think!r}")
        return config


_DEFAULT_CONFIG = MathVerifyConfig()


def _math_verify():
    import math_verify  # noqa: PLC0415  (heavy: sympy + antlr; imported once per worker)

    # Every call disables math-verify's timeout on purpose; its warning about that is noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


# Choice answers: "(C)", "\text{(C)}", "C", "\textbf{C}" all mean the letter C.
_CHOICE_RE = re.compile(r"^\(?([A-Ea-e])\)?$")
_TEXT_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|textup)\{(.*)\}$", re.DOTALL)
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMPY_FUNC_RE = re.compile(r"\bnp\.(arcsin|arccos|arctan|sin|cos|tan|log|exp|sqrt)\b")
_DOT_BEFORE_SLASH_RE = re.compile(r"(\d)\.(?=/)")
_PERCENT_RE = re.compile(r"\\?%\s*$")


def normalize_answer_text(text: str) -> str:
    """Light, meaning-preserving clean-up of an answer string before LaTeX parsing.

    Strips ``$``/``\\(``/``\\[`` delimiters and surrounding whitespace and a trailing period; rewrites
    ``\\dfrac``/``\\tfrac`` as ``\\frac`` and ``°`` as ``^\\circ``; removes thousands separators from plain
    numbers (``1,234``); turns ``np.arcsin`` (a few Minerva golds) into ``\\arcsin``; ``-1./3`` into ``-1/3``.
    """
    text = text.strip()
    for opener, closer in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)")):
        if text.startswith(opener) and text.endswith(closer) and len(text) >= len(opener) + len(closer):
            text = text[len(opener) : len(text) - len(closer)].strip()
    if "$" in text and "\\$" not in text:
        # OlympiadBench-style golds wrap each part in $...$ ("$x=1$, $y=2$").
        text = text.replace("$", "").strip()
    text = text.rstrip(".").strip()
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("°", "^\\circ")
    text = _NUMPY_FUNC_RE.sub(r"\\\1", text)
    text = _DOT_BEFORE_SLASH_RE.sub(r"\1", text)
    if _THOUSANDS_RE.match(text):
        text = text.replace(",", "")
    return text


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter an answer names (``"\\text{(C)}"`` -> ``"C"``), or None."""
    text = text.strip()
    while True:
        wrapped = _TEXT_WRAPPER_RE.match(text)
        if not wrapped:
            break
        text = wrapped.group(1).strip()
    match = _CHOICE_RE.match(text)
    return match.group(1).upper() if match else None


@lru_cache(maxsize=4096)
def _parse_latex(text: str) -> tuple:
    # Wrapping in \boxed{} routes the text through math-verify's LaTeX normalization (units, \text, ...).
    mv = _math_verify()
    return tuple(mv.parse("\\boxed{" + text + "}", parsing_timeout=None))


def parse_gold(answer: str) -> tuple:
    """Parsed forms of a gold answer (sympy objects and/or the normalized string); cached per worker."""
    return _parse_latex(normalize_answer_text(answer))


def _has_math(parsed: tuple) -> bool:
    return any(not isinstance(item, str) for item in parsed)


def _verify(gold: tuple, pred: tuple, config: MathVerifyConfig) -> bool:
    return bool(
        _math_verify().verify(
            list(gold),
            list(pred),
            float_rounding=config.float_rounding,
            numeric_precision=config.numeric_precision,
            strict=config.strict,
            timeout_seconds=None,
        )
    )


def grade_math(
    prompt: str, response: str, answer: str, metadata: dict | None = None, **kwargs: Any
) -> RewardResult:
    """Grade ``response`` against the gold ``answer``; no timeout (see the module docstring).

    Returns score ``correct_score``/``incorrect_score`` with status ``"ok"``, or a fail-closed result with
    status ``"parse_fail"`` (no answer found, or it did not parse) or ``"error"`` (gold did not parse,
    unexpected exception inside math-verify).
    """
    start = time.perf_counter()
    config = MathVerifyConfig.from_kwargs(kwargs) if kwargs else _DEFAULT_CONFIG
    mv = _math_verify()

    def elapsed() -> float:
        return time.perf_counter() - start

    extraction = extract_answer(response)
    if extraction.unclosed_think and config.unclosed_think == "fail":
        return failed_result("parse_fail", "response has an unclosed <think> block", elapsed())

    gold_text = normalize_answer_text(answer)
    gold = _parse_latex(gold_text)
    if not gold:
        return failed_result("error", f"gold answer {answer[:200]!r} could not be parsed", elapsed())

    if extraction.answer is None:
        if not config.unanchored_fallback:
            return failed_result("parse_fail", "no \\boxed{}, '####' or 'answer is' in the response", elapsed())
        pred = tuple(mv.parse(extraction.final_text[-_FALLBACK_TAIL_CHARS:], parsing_timeout=None))
        extracted = next((item for item in pred if isinstance(item, str)), None)
        if not _has_math(pred):
            return failed_result("parse_fail", "no answer found in the response", elapsed(), extracted)
    else:
        extracted = extraction.answer
        if len(extracted) > MAX_ANSWER_CHARS:
            return failed_result(
                "parse_fail", f"extracted answer is {len(extracted)} chars (max {MAX_ANSWER_CHARS})", elapsed(),
                extracted[:200],
            )
        gold_letter = choice_letter(gold_text)
        if gold_letter is not None:
            pred_letter = choice_letter(normalize_answer_text(extracted))
            if pred_letter is not None:
                correct = pred_letter == gold_letter
                score = config.correct_score if correct else config.incorrect_score
                return RewardResult(score=score, correct=correct, extracted=extracted, time_s=elapsed())
        pred = _parse_latex(normalize_answer_text(extracted))
        if not pred:
            return failed_result("parse_fail", "extracted answer did not parse", elapsed(), extracted)

    correct = _verify(gold, pred, config)
    if not correct and extracted is not None and (_PERCENT_RE.search(extracted) or _PERCENT_RE.search(gold_text)):
        # math-verify already treats "9%" as "9" for integers; do the same for "12.5%" vs "12.5".
        correct = _verify(
            _parse_latex(_PERCENT_RE.sub("", gold_text)),
            _parse_latex(_PERCENT_RE.sub("", normalize_answer_text(extracted))),
            config,
        )
    if not correct and not _has_math(pred):
        return failed_result("parse_fail", "extracted answer is not valid math", elapsed(), extracted)
    score = config.correct_score if correct else config.incorrect_score
    return RewardResult(score=score, correct=correct, extracted=extracted, status="ok", time_s=elapsed())


def _self_test() -> None:
    """Fail loudly when math-verify cannot parse LaTeX here (e.g. a mismatched antlr4 runtime makes every
    parse fail, which would silently grade everything 0)."""
    cases = (("so $\\boxed{\\dfrac{1}{2}}$", "0.5", True), ("\\boxed{3}", "2", False), ("#### 1,000", "1000", True))
    for response, gold, expected in cases:
        result = grade_math("", response, gold, {})
        assert result.correct == expected and result.status == "ok", (
            f"math_verify self-test: {response!r} vs gold {gold!r} gave {result}; is math-verify installed with "
            "a matching antlr4-python3-runtime (see latex2sympy2_extended's requirements)?"
        )


register_reward(
    "math_verify",
    is_verifier=True,
    description="1 if the final answer (last \\boxed{}, ####, 'answer is') is equivalent to the gold (math-verify)",
    check_kwargs=MathVerifyConfig.from_kwargs,
    self_test=_self_test,
)(grade_math)
