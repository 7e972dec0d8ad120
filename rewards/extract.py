"""Find the final answer in a model response (pure text processing, no sympy).

Order of preference, on the text after the last ``</think>``:
1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched; an unclosed one is skipped; several
   boxed answers written next to each other, e.g. ``\\boxed{2} and \\boxed{3}``, are joined as ``"2, 3"``);
2. the text after the last ``####`` (GSM8K style);
3. the text after the last "answer is" / "Answer:" / "final answer:".
Everything here is linear in the input length, with hard caps, so it is safe on adversarial text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Only the tail of a response can hold its final answer; scanning more is wasted work on adversarial input.
MAX_SCAN_CHARS = 65_536
# Longer "answers" are not answers; they would only feed the LaTeX parser something pathological.
MAX_ANSWER_CHARS = 1_000
_MAX_BOXED_CANDIDATES = 32
_MAX_JOINED_BOXED = 10

_THINK_CLOSE_RE = re.compile(r"</think(?:ing)?>", re.IGNORECASE)
_THINK_OPEN_RE = re.compile(r"<think(?:ing)?>", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b\s*")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
# What may sit between two boxed answers that belong to one final answer: "\boxed{2}, \boxed{3}",
# "$\boxed{2}$ and $\boxed{3}$", "\boxed{2} \quad \boxed{3}".
_BOXED_SEPARATOR_RE = re.compile(
    r"^(?:\s|,|;|\$|\\quad|\\qquad|\\,|\\;|\\\(|\\\)|\\\[|\\\]|\band\b|\bor\b|\\text\{\s*(?:and|or|,)\s*\})*$"
)
_ANSWER_PHRASE_RE = re.compile(
    r"(?i)\b(?:final\s+answer|answer)\b(?:\s*\*\*)?\s*(?:is\s*:?|:|=)(?:\s*\*\*)?[ \t]*"
)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|\n")
# Closing math delimiters, skipping escaped dollars ("$\$36$").
_DOLLAR_CLOSE_RE = re.compile(r"(?<!\\)\$")
_DISPLAY_DOLLAR_CLOSE_RE = re.compile(r"(?<!\\)\$\$")
_BRACKET_CLOSE_RE = re.compile(r"\\\]")
_PAREN_CLOSE_RE = re.compile(r"\\\)")


@dataclass(frozen=True)
class Extraction:
    """The answer found in a response.

    answer:         the answer text (without ``\\boxed{}``/``$``), or None when no anchored answer was found.
    method:         ``"boxed"``, ``"hash"`` (``####``), ``"answer_phrase"`` or ``"none"``.
    final_text:     the part of the response that was searched (after ``</think>``, tail-capped).
    unclosed_think: the response opened a ``<think>`` block it never closed.
    num_boxed:      number of closed ``\\boxed{}``/``\\fbox{}`` in ``final_text``.
    """

    answer: str | None
    method: str
    final_text: str
    unclosed_think: bool = False
    num_boxed: int = 0


def sanitize(text: str) -> str:
    """Drop NUL bytes and replace lone surrogates (invalid UTF-8 from a decoder) with '?'."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def strip_thinking(text: str) -> tuple[str, bool]:
    """Return (text after the last ``</think>``, whether a ``<think>`` is left unclosed).

    With no ``</think>`` at all the whole text is returned (many prompts open ``<think>`` in the template, so
    the response only has the closing tag; others never think).
    """
    last_close = None
    for last_close in _THINK_CLOSE_RE.finditer(text):
        pass
    if last_close is not None:
        text = text[last_close.end():]
    return text, _THINK_OPEN_RE.search(text) is not None


def match_brace(text: str, open_index: int, limit: int = MAX_ANSWER_CHARS * 4) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index`` (escaped ``\\{``/``\\}`` skipped), or None."""
    assert text[open_index] == "{"
    depth = 0
    end = min(len(text), open_index + limit)
    for token in _BRACE_TOKEN_RE.finditer(text, open_index, end):
        char = token.group()
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return token.start()
    return None


def find_boxed(text: str) -> list[tuple[int, int, str]]:
    """All closed ``\\boxed``/``\\fbox`` answers as (start, end, content), last ones first, capped in number.

    ``\\boxed 5`` (no braces) takes the next token, as LaTeX does.
    """
    starts = [m for m in _BOXED_RE.finditer(text)]
    found: list[tuple[int, int, str]] = []
    for m in reversed(starts[-_MAX_BOXED_CANDIDATES:]):
        pos = m.end()
        if pos < len(text) and text[pos] == "{":
            close = match_brace(text, pos)
            if close is None:
                continue  # unclosed \boxed{: skip it, an earlier one may be fine
            found.append((m.start(), close + 1, text[pos + 1 : close]))
        else:
            token = re.match(r"[^\s$\\{}]+", text[pos : pos + MAX_ANSWER_CHARS])
            if token:
                found.append((m.start(), pos + token.end(), token.group()))
    return found


def _last_boxed_run(boxed: list[tuple[int, int, str]], text: str) -> str | None:
    """Join the last boxed answer with the ones right before it when only separators lie between."""
    if not boxed:
        return None
    run = [boxed[0]]
    for start, end, content in boxed[1:]:
        next_start = run[-1][0]
        if end > next_start:
            break  # nested (\boxed{x=\boxed{5}}): keep the inner, last one
        if len(run) >= _MAX_JOINED_BOXED or not _BOXED_SEPARATOR_RE.match(text[end:next_start]):
            break
        run.append((start, end, content))
    return ", ".join(content.strip() for _, _, content in reversed(run))


def _after_hashes(text: str) -> str | None:
    index = text.rfind("####")
    if index < 0:
        return None
    line = text[index + 4 :].split("\n", 1)[0]
    return _clean_inline(line)


def _after_answer_phrase(text: str) -> str | None:
    last = None
    for last in _ANSWER_PHRASE_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() : last.end() + MAX_ANSWER_CHARS * 2]
    for opener, closer in (("$$", _DISPLAY_DOLLAR_CLOSE_RE), ("\\[", _BRACKET_CLOSE_RE), ("\\(", _PAREN_CLOSE_RE),
                           ("$", _DOLLAR_CLOSE_RE)):
        if rest.startswith(opener):
            close = closer.search(rest, len(opener))
            if close is not None:
                return _clean_inline(rest[len(opener) : close.start()])
    sentence_end = _SENTENCE_END_RE.search(rest)
    return _clean_inline(rest[: sentence_end.start()] if sentence_end else rest)


def _clean_inline(answer: str) -> str | None:
    answer = answer.strip().strip("*").strip()
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    answer = answer.rstrip(".").strip()
    return answer or None


def extract_answer(response: str) -> Extraction:
    """Find the final answer in ``response`` (see the module docstring for the order)."""
    final_text, unclosed_think = strip_thinking(sanitize(response))
    final_text = final_text[-MAX_SCAN_CHARS:]
    boxed = find_boxed(final_text)
    answer = _last_boxed_run(boxed, final_text)
    if answer is not None:
        return Extraction(answer, "boxed", final_text, unclosed_think, len(boxed))
    for method, finder in (("hash", _after_hashes), ("answer_phrase", _after_answer_phrase)):
        answer = finder(final_text)
        if answer is not None:
            return Extraction(answer, method, final_text, unclosed_think, 0)
    return Extraction(None, "none", final_text, unclosed_think, 0)
