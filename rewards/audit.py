"""Second opinion on "incorrect" verdicts, to catch verifier false negatives.

For a sampled fraction of the verifier's incorrect verdicts, an independent check compares the extracted
answer with the gold in two ways that share no code with math-verify:

* a loose string normalization (spacing, ``\\left``/``\\right``, ``\\text{}``, degrees, ``$``, trailing zeros);
* numeric evaluation with a small restricted parser (numbers, ``+ - * / ^``, parentheses, ``\\frac``,
  ``\\sqrt``, ``\\pi``, ``%``; nothing else). Model text is never passed to ``eval``.

When the second opinion says "equivalent", the disagreement is counted and, if a path is configured, logged
as one JSON line with the response and the gold. Every step here is linear in the (capped) input length.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rl.types import RewardResult
from rewards.base import RewardRequest

_MAX_AUDIT_CHARS = 300
_TAIL_CHARS = 4_000
_MAX_DEPTH = 40
_MAX_EXPONENT = 1_000.0

_SIMPLE_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\{((?:[^{}]|\{[^{}]*\})*)\}")
_LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\left|\\right|\\[!,;:> ]|\\quad|\\qquad|\s|\$")
_DEGREE_RE = re.compile(r"\^\s*\{?\\circ\}?|°|\\circ|\\degree")
_LEADING_VAR_RE = re.compile(r"^[a-z]\s*=(?!=)")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def loose_normalize(text: str) -> str:
    """A forgiving canonical form of an answer string (for comparison only, never for grading)."""
    text = text.strip()
    text = _WRAPPER_RE.sub(r"\1", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _DEGREE_RE.sub("", text)
    text = text.replace("\\%", "").replace("%", "").replace("{,}", ",")
    text = _SPACING_RE.sub("", text).lower().rstrip(".")
    text = _LEADING_VAR_RE.sub("", text)
    text = _THOUSANDS_RE.sub("", text)
    if re.fullmatch(r"-?\d+\.\d*", text):
        text = text.rstrip("0").rstrip(".")
    if re.fullmatch(r"-?0+\d+", text):
        sign = "-" if text.startswith("-") else ""
        text = sign + text.lstrip("-").lstrip("0")
    return text


_TOKEN_RE = re.compile(r"\d+\.?\d*|\.\d+|\\[a-zA-Z]+|[-+*/^(){}\[\]%]")
_IGNORED_COMMANDS = {"\\left", "\\right", "\\displaystyle"}


class _NotNumeric(Exception):
    """The text is outside the restricted arithmetic subset (or overflows)."""


class _NumericParser:
    """Recursive-descent evaluator for a tiny LaTeX arithmetic subset (see module docstring)."""

    def __init__(self, text: str) -> None:
        text = _THOUSANDS_RE.sub("", text)
        text = _SPACING_RE.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
        text = text.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
        tokens = _TOKEN_RE.findall(text)
        if "".join(tokens) != text:
            raise _NotNumeric(text)  # characters outside the subset (variables, functions...)
        self.tokens = [t for t in tokens if t not in _IGNORED_COMMANDS]
        self.pos = 0
        self.depth = 0

    def parse(self) -> float:
        value = self._expr()
        if self.pos != len(self.tokens):
            raise _NotNumeric("trailing tokens")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> str:
        token = self._peek()
        if token is None or (expected is not None and token != expected):
            raise _NotNumeric(f"expected {expected!r}, got {token!r}")
        self.pos += 1
        return token

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _NotNumeric("too deep")

    def _expr(self) -> float:
        self._enter()
        value = self._term()
        while self._peek() in ("+", "-"):
            value = value + self._term() if self._take() == "+" else value - self._term()
        self.depth -= 1
        return value

    def _term(self) -> float:
        value = self._unary()
        while True:
            token = self._peek()
            if token in ("*", "/"):
                self._take()
                rhs = self._unary()
                if token == "/":
                    if rhs == 0:
                        raise _NotNumeric("division by zero")
                    value /= rhs
                else:
                    value *= rhs
            elif token is not None and (token[0].isdigit() or token in ("(", "{", "\\frac", "\\sqrt", "\\pi")):
                value *= self._unary()  # implicit multiplication: 2\sqrt{3}, 3\pi
            else:
                return value

    def _unary(self) -> float:
        if self._peek() in ("-", "+"):
            sign = -1.0 if self._take() == "-" else 1.0
            self._enter()
            value = sign * self._unary()
            self.depth -= 1
            return value
        return self._power()

    def _power(self) -> float:
        base = self._primary()
        if self._peek() == "%":
            self._take()
            base /= 100.0
        if self._peek() != "^":
            return base
        self._take()
        self._enter()
        exponent = self._unary()
        self.depth -= 1
        if abs(exponent) > _MAX_EXPONENT or (base < 0 and not float(exponent).is_integer()):
            raise _NotNumeric("exponent out of range")
        try:
            return math.pow(base, exponent)
        except (OverflowError, ValueError) as exc:
            raise _NotNumeric(str(exc)) from exc

    def _group_or_digit(self) -> float:
        # \frac12 means \frac{1}{2}: a bare argument is a single digit.
        token = self._peek()
        if token is not None and token[0].isdigit() and token.isdigit():
            self.tokens[self.pos] = token[1:]
            if not self.tokens[self.pos]:
                self.pos += 1
            return float(token[0])
        self._take("{")
        value = self._expr()
        self._take("}")
        return value

    def _primary(self) -> float:
        token = self._take()
        if token[0].isdigit() or token[0] == ".":
            return float(token)
        if token in ("(", "{"):
            value = self._expr()
            self._take(")" if token == "(" else "}")
            return value
        if token == "\\pi":
            return math.pi
        if token == "\\frac":
            numerator = self._group_or_digit()
            denominator = self._group_or_digit()
            if denominator == 0:
                raise _NotNumeric("division by zero")
            return numerator / denominator
        if token == "\\sqrt":
            index = 2.0
            if self._peek() == "[":
                self._take()
                index = self._expr()
                self._take("]")
            radicand = self._group_or_digit()
            if radicand < 0 or index == 0:
                raise _NotNumeric("bad root")
            return radicand ** (1.0 / index)
        raise _NotNumeric(f"unsupported token {token!r}")


def safe_numeric_value(text: str) -> float | None:
    """Numeric value of a short arithmetic LaTeX string, or None outside the supported subset."""
    if len(text) > _MAX_AUDIT_CHARS:
        return None
    try:
        value = _NumericParser(text).parse()
    except (_NotNumeric, IndexError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class SecondOpinion:
    """Result of the independent check.

    equivalent: the check considers the candidate equal to the gold.
    method:     ``"string"``, ``"numeric"`` or ``"none"`` (no method applied or they differ).
    candidate:  the answer text that was compared.
    """

    equivalent: bool
    method: str
    candidate: str | None


def _independent_candidate(response: str) -> str | None:
    tail = response[-_TAIL_CHARS:]
    boxed = _SIMPLE_BOXED_RE.findall(tail)
    if boxed:
        return boxed[-1]
    numbers = _LAST_NUMBER_RE.findall(tail)
    return numbers[-1] if numbers else None


def second_opinion(response: str, extracted: str | None, gold: str) -> SecondOpinion:
    """Compare the verifier's extracted answer (or, without one, the last boxed/number in the response)
    with the gold using loose string normalization, then restricted numeric evaluation."""
    candidate = extracted if extracted is not None else _independent_candidate(response)
    if candidate is None or len(candidate) > _MAX_AUDIT_CHARS or len(gold) > _MAX_AUDIT_CHARS:
        return SecondOpinion(False, "none", candidate)
    cand_norm, gold_norm = loose_normalize(candidate), loose_normalize(gold)
    if cand_norm and cand_norm == gold_norm:
        return SecondOpinion(True, "string", candidate)
    cand_value, gold_value = safe_numeric_value(cand_norm), safe_numeric_value(gold_norm)
    if cand_value is not None and gold_value is not None:
        if math.isclose(cand_value, gold_value, rel_tol=1e-6, abs_tol=1e-9):
            return SecondOpinion(True, "numeric", candidate)
    return SecondOpinion(False, "none", candidate)


def _clip_middle(text: str, limit: int = 20_000) -> str:
    if len(text) <= limit:
        return text
    head = limit // 10
    return text[:head] + f"\n...[{len(text) - limit} chars cut]...\n" + text[-(limit - head):]


class Auditor:
    """Samples "incorrect" verdicts, gets a second opinion, counts and logs disagreements.

    fraction: probability that an incorrect verdict is audited (0 disables auditing).
    log_path: JSONL file that disagreements are appended to (None: count only).
    seed:     seed of the sampling RNG (reproducible audits).
    """

    def __init__(self, fraction: float, log_path: str | None, seed: int) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"audit_fraction must be in [0, 1], got {fraction!r}")
        self.fraction = fraction
        self.log_path = Path(log_path) if log_path else None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def should_audit(self, result: RewardResult) -> bool:
        """Whether to audit this verifier result (incorrect, not a timeout/error, and sampled)."""
        if self.fraction <= 0.0 or result.correct or result.status not in ("ok", "parse_fail"):
            return False
        return self._rng.random() < self.fraction

    def audit(self, reward_name: str, request: RewardRequest, result: RewardResult) -> bool:
        """Run the second opinion on one incorrect verdict; log it and return True when they disagree."""
        opinion = second_opinion(request.response, result.extracted, request.answer)
        if not opinion.equivalent:
            return False
        if self.log_path is not None:
            row = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "reward": reward_name,
                "verdict": {"correct": result.correct, "status": result.status, "extracted": result.extracted,
                            "error": result.error},
                "audit": {"method": opinion.method, "candidate": opinion.candidate},
                "gold": request.answer,
                "prompt": _clip_middle(request.prompt, 4_000),
                "response": _clip_middle(request.response),
            }
            with self._lock, self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        return True
