"""DC-CoT parallel reasoning, the pure part: the response grammar, the config, budgets and the latency measure.

Divide-and-conquer chain of thought (Mahankali, Wen, Ma, arXiv 2601.23027; ``docs/dccot.md``):
a *director* thinks sequentially and, at points of its choosing, opens a spawn block in which a fixed number of
*workers* think in parallel, each seeing the director's text so far but not each other. A response reads::

    <think>
    director text (non-empty before every spawn block)
    <spawn_workers><worker_1> ... </worker_1><worker_2> ... </worker_2><worker_3> ... </worker_3></spawn_workers>
    director text ... (more spawn blocks)
    </think>
    <answer> ... \\boxed{final} </answer>

Latency is the longest path through this tree (``docs/dccot.md`` "Latency measure and budgets"): the director's
tokens plus, per spawn block, the longest worker. Everything here is a function of plain values (strings and token
counts); the executor that talks to an engine is ``rollout/dccot.py`` and the rewards are ``rewards/dccot.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field, model_validator

from rl.schema import StrictModel

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
SPAWN_OPEN, SPAWN_CLOSE = "<spawn_workers>", "</spawn_workers>"


def worker_open(i: int) -> str:
    """The opener of worker ``i`` (1-based): ``<worker_i>``."""
    return f"<worker_{i}>"


def worker_close(i: int) -> str:
    """The closer of worker ``i`` (1-based): ``</worker_i>``; also that worker's stop string."""
    return f"</worker_{i}>"


class DCCoTConfig(StrictModel):
    """Rollout shape and budgets of DC-CoT (``docs/dccot.md`` "Executor"; reference code:
    ``vllm_rollout_parallel_workers.py``).

    Token counts follow ``docs/dccot.md`` "Latency measure and budgets": a worker's length includes its injected
    ``<worker_i>`` opener, a director segment after a spawn block includes the injected ``</spawn_workers>``.
    """

    _kind: ClassVar[str] = "dccot"

    workers_per_block: int = Field(
        3,
        ge=1,
        description="Workers launched per spawn block. The count is fixed by config, not read from the model: the "
        "executor always opens workers 1..N and the grammar requires exactly N, in order. Reference: 3 in every stage.",
    )
    max_spawn_blocks: int = Field(
        8,
        ge=1,
        description="Most spawn blocks per response (reference `max_parallel_rounds`; its value in the stage "
        "scripts is not recorded in the spec). A director that opens one more ends the trajectory there "
        "(format-invalid).",
    )
    max_worker_tokens: int = Field(
        2048,
        ge=1,
        description="Most tokens one worker may generate per block, excluding its opener (reference "
        "`max_tokens_in_parallel_round`); a worker cut here has no closer and makes the response format-invalid.",
    )
    max_director_segment_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens the director may generate between two spawn blocks (None: only the path budget "
        "limits it, as in the reference). A director cut here ends the trajectory.",
    )
    max_path_tokens: int = Field(
        7500,
        ge=1,
        description="Budget P on the longest path (latency): director tokens plus the longest worker of each block "
        "(reference `max_response_length`: 7500 in stages 1-3, 12000 in stage 4 and HLP).",
    )
    max_total_tokens: int | None = Field(
        None,
        ge=1,
        description="Optional budget T on all tokens (director plus every worker; bounds the packed training "
        "sequence). When it runs out inside a block, workers are cut in order and later ones dropped. Reference "
        "`additional_total_length_limit`: none in stages 1-3, 21000 in stage 4 and HLP.",
    )

    @property
    def context_tokens(self) -> int:
        """Most response tokens a director context can hold: the total budget, or without one the path budget plus
        the other workers' copies (each with an opener of a few tokens; 8 is generous for real tokenizers)."""
        if self.max_total_tokens is not None:
            return self.max_total_tokens
        return self.max_path_tokens + self.max_spawn_blocks * (self.workers_per_block - 1) * (self.max_worker_tokens + 8)

    @model_validator(mode="after")
    def _budgets_consistent(self) -> "DCCoTConfig":
        if self.max_total_tokens is not None and self.max_total_tokens < self.max_path_tokens:
            raise ValueError(
                f"dccot: max_total_tokens ({self.max_total_tokens}) < max_path_tokens ({self.max_path_tokens}); the "
                "total budget bounds every path, so raise it or set it to None"
            )
        return self


class DCCoTRewardConfig(StrictModel):
    """Options of the ``dccot`` reward (its ``RewardSpec.kwargs``; ``docs/dccot.md`` "Rewards", defaults: stage 1).

    HLP stage: ``max_path_tokens=12000, overlong_buffer_tokens=10000, overlong_penalty_factor=0.9,
    correct_no_format_score=0.01, penalty_requires_format=True``.
    """

    _kind: ClassVar[str] = "dccot reward"

    workers_per_block: int = Field(3, ge=1, description="Workers the grammar requires in every spawn block.")
    max_spawn_blocks: int | None = Field(
        None, ge=1, description="Most spawn blocks a format-valid response may hold (None: no limit)."
    )
    correct_score: float = Field(1.0, description="Base score of a correct, format-valid response.")
    correct_no_format_score: float = Field(
        0.5, description="Base score of a correct response that breaks the grammar (0.5 in stages 1-4, 0.01 in HLP)."
    )
    incorrect_format_score: float = Field(0.0, description="Base score of a wrong, format-valid response.")
    max_path_tokens: int = Field(7500, ge=1, description="L_max of the overlong penalty, on the longest path.")
    overlong_buffer_tokens: int = Field(
        5500,
        ge=0,
        description="L_buf: the penalty starts at L_max - L_buf and falls linearly by `overlong_penalty_factor` "
        "per L_buf tokens (0: no penalty). 5500 in stages 1-4, 10000 in HLP.",
    )
    overlong_penalty_factor: float = Field(
        0.1, ge=0.0, description="Penalty at L_max (0.1 in stages 1-4, 0.9 in HLP)."
    )
    penalty_requires_format: bool = Field(
        False,
        description="Apply the length penalty only to correct AND format-valid responses (HLP); False: to every "
        "correct response (stages 1-4). Wrong responses are never penalized.",
    )
    prepend_think: bool = Field(
        True,
        description="Prepend '<think>\\n' to the response before checking it: the DC-CoT prompt template ends in "
        "'<think>\\n', so the model's response starts inside the think block.",
    )
    answer_in_answer_tags: bool = Field(
        False,
        description="Grade only the text inside the last <answer>...</answer> (reference "
        "`enforce_answer_between_answer_tags`); False: grade the text after the last </think>.",
    )

    @model_validator(mode="after")
    def _buffer_fits(self) -> "DCCoTRewardConfig":
        if self.overlong_buffer_tokens > self.max_path_tokens:
            raise ValueError(
                f"dccot reward: overlong_buffer_tokens ({self.overlong_buffer_tokens}) exceeds max_path_tokens "
                f"({self.max_path_tokens}); the penalty would start below 0 tokens"
            )
        return self


# ----------------------------------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class SpawnBlock:
    """One parsed spawn block: the director text just before it and each worker's text (without tags)."""

    director_text: str
    worker_texts: tuple[str, ...]


@dataclass(frozen=True)
class ParsedResponse:
    """A response that follows the grammar.

    blocks:           the spawn blocks in order (at least one).
    final_director:   director text after the last spawn block, up to ``</think>``.
    answer_text:      text inside ``<answer>...</answer>``.
    """

    blocks: tuple[SpawnBlock, ...]
    final_director: str
    answer_text: str


@dataclass(frozen=True)
class FormatCheck:
    """Verdict of :func:`check_format`.

    valid:  the response follows the grammar.
    reason: ``None`` when valid, else one of :data:`FORMAT_ERRORS` (the first violation found, left to right).
    detail: a human-readable explanation with the position (character offset) of the violation.
    parsed: the structure when valid.
    """

    valid: bool
    reason: str | None = None
    detail: str = ""
    parsed: ParsedResponse | None = None


FORMAT_ERRORS = (
    "text_outside_tags",  # non-whitespace before <think>, between </think> and <answer>, or after </answer>
    "missing_think",  # the response does not open <think>
    "empty_director_text",  # a spawn block with no director text since <think> or the previous block
    "text_in_spawn_block",  # non-whitespace inside <spawn_workers> but outside every worker
    "worker_order",  # <worker_j> where <worker_i> (the next in order) was due
    "too_many_workers",  # a worker beyond workers_per_block
    "missing_worker",  # </spawn_workers> before all workers ran
    "unclosed_worker",  # a worker not closed by its own </worker_i> before the next tag or the end
    "nested_spawn",  # <spawn_workers> inside a worker or inside an open spawn block
    "unclosed_spawn",  # a spawn block not closed by </spawn_workers>
    "stray_tag",  # a tag where the grammar allows none (e.g. </worker_1> in director text, <think> twice)
    "no_spawn_blocks",  # </think> reached without any spawn block
    "too_many_spawn_blocks",  # more spawn blocks than max_spawn_blocks
    "missing_think_close",  # the text ends inside <think>
    "missing_answer",  # no <answer> after </think>
    "unclosed_answer",  # the text ends inside <answer>
)

_TAG_RE = re.compile(r"</?(?:think|answer|spawn_workers|worker_[1-9][0-9]*)>")


def check_format(text: str, workers_per_block: int = 3, max_spawn_blocks: int | None = None) -> FormatCheck:
    """Validate a full DC-CoT response (starting at ``<think>``) against the grammar of ``docs/dccot.md`` "Format".

    Accepted, with only whitespace allowed where nothing is written::

        ws <think> (D SPAWN)+ D' </think> ws <answer> A </answer> ws
        SPAWN = <spawn_workers> ws (<worker_1> W </worker_1> ws) ... (<worker_N> W </worker_N> ws) </spawn_workers>

    where every ``D`` has a non-whitespace character, ``D'``, ``W`` and ``A`` may be empty, N is
    ``workers_per_block``, and none of ``D``, ``D'``, ``W``, ``A`` contains a tag of the grammar. Tags are matched
    exactly (case-sensitive, no attributes); ``<worker_0>`` or ``<worker_01>`` are plain text.
    """
    assert workers_per_block >= 1
    blocks: list[SpawnBlock] = []
    state = "start"  # start | director | spawn | worker | after_think | answer | end
    director_text = ""
    workers: list[str] = []
    worker_start = 0
    final_director = answer_text = ""
    pos = 0

    def fail(reason: str, detail: str, at: int) -> FormatCheck:
        assert reason in FORMAT_ERRORS, reason
        return FormatCheck(False, reason, f"{detail} (at char {at})")

    for match in _TAG_RE.finditer(text):
        tag, between, at = match.group(), text[pos : match.start()], match.start()
        pos = match.end()
        if state in ("start", "after_think", "end") and between.strip():
            snippet = between.strip()[:40]
            return fail("text_outside_tags", f"text {snippet!r} outside <think>/<answer>", at - len(between))
        if state == "start":
            if tag != THINK_OPEN:
                return fail("missing_think", f"the response must open with {THINK_OPEN}, found {tag}", at)
            state, director_text = "director", ""
        elif state == "director":
            director_text += between
            if tag == SPAWN_OPEN:
                if not director_text.strip():
                    return fail("empty_director_text", "a spawn block needs director text before it", at)
                if max_spawn_blocks is not None and len(blocks) >= max_spawn_blocks:
                    return fail("too_many_spawn_blocks", f"more than {max_spawn_blocks} spawn blocks", at)
                state, workers = "spawn", []
            elif tag == THINK_CLOSE:
                if not blocks:
                    return fail("no_spawn_blocks", "the think block has no spawn block", at)
                state, final_director = "after_think", director_text
            else:
                return fail("stray_tag", f"{tag} in director text", at)
        elif state == "spawn":
            if between.strip():
                return fail("text_in_spawn_block", f"text {between.strip()[:40]!r} between workers", at - len(between))
            due = len(workers) + 1
            if tag == SPAWN_CLOSE:
                if len(workers) < workers_per_block:
                    seen = f"{len(workers)} of {workers_per_block}"
                    return fail("missing_worker", f"{SPAWN_CLOSE} after {seen} workers", at)
                blocks.append(SpawnBlock(director_text, tuple(workers)))
                state, director_text = "director", ""
            elif tag.startswith("<worker_"):
                index = int(tag[len("<worker_") : -1])
                if index > workers_per_block:
                    return fail("too_many_workers", f"{tag} but a block has {workers_per_block} workers", at)
                if index != due:
                    return fail("worker_order", f"{tag} where {worker_open(due)} was due", at)
                state, worker_start = "worker", pos
            elif tag == SPAWN_OPEN:
                return fail("nested_spawn", f"{SPAWN_OPEN} inside an open spawn block", at)
            else:
                return fail("unclosed_spawn", f"{tag} before {SPAWN_CLOSE}", at)
        elif state == "worker":
            index = len(workers) + 1
            if tag == worker_close(index):
                workers.append(text[worker_start:at])
                state = "spawn"
            elif tag == SPAWN_OPEN:
                return fail("nested_spawn", f"{SPAWN_OPEN} inside {worker_open(index)}", at)
            else:
                return fail("unclosed_worker", f"{tag} inside {worker_open(index)} before {worker_close(index)}", at)
        elif state == "after_think":
            if tag != ANSWER_OPEN:
                return fail("stray_tag", f"{tag} where {ANSWER_OPEN} was due", at)
            state = "answer"
        elif state == "answer":
            if tag != ANSWER_CLOSE:
                return fail("stray_tag", f"{tag} inside the answer", at)
            state, answer_text = "end", between
        else:  # end
            return fail("stray_tag", f"{tag} after {ANSWER_CLOSE}", at)

    rest, end = text[pos:], len(text)
    if state == "start":
        if rest.strip():
            return fail("text_outside_tags", f"text {rest.strip()[:40]!r} and no {THINK_OPEN}", pos)
        return fail("missing_think", f"no {THINK_OPEN}", end)
    if state == "end":
        if rest.strip():
            return fail("text_outside_tags", f"text {rest.strip()[:40]!r} after {ANSWER_CLOSE}", pos)
        return FormatCheck(True, parsed=ParsedResponse(tuple(blocks), final_director, answer_text))
    if state == "after_think":
        if rest.strip():
            return fail("text_outside_tags", f"text {rest.strip()[:40]!r} after {THINK_CLOSE}", pos)
        return fail("missing_answer", f"no {ANSWER_OPEN} after {THINK_CLOSE}", end)
    ending = {
        "director": ("missing_think_close", f"the text ends before {THINK_CLOSE}"),
        "spawn": ("unclosed_spawn", f"the text ends before {SPAWN_CLOSE}"),
        "worker": ("unclosed_worker", f"the text ends inside {worker_open(len(workers) + 1)}"),
        "answer": ("unclosed_answer", f"the text ends before {ANSWER_CLOSE}"),
    }
    return fail(*ending[state], end)


# ----------------------------------------------------------------------------------------------- latency


def response_format_valid(response: str, workers_per_block: int = 3, max_spawn_blocks: int | None = None) -> bool:
    """Whether a sampled response (which continues a prompt ending in ``<think>``) follows the grammar: it is
    checked as ``"<think>\\n" + response`` unless it opens its own ``<think>``."""
    text = response if response.lstrip().startswith(THINK_OPEN) else THINK_OPEN + "\n" + response
    return check_format(text, workers_per_block, max_spawn_blocks).valid


@dataclass(frozen=True)
class PathLengths:
    """Latency measure of one response (``docs/dccot.md`` "Latency measure and budgets"), in tokens.

    longest_path_tokens: sum of director segments + per spawn block the longest worker (L_parallel).
    total_tokens:        sum of director segments + every worker (L_total).
    num_spawn_blocks:    spawn blocks that ran.
    """

    longest_path_tokens: int
    total_tokens: int
    num_spawn_blocks: int

    @property
    def parallelism(self) -> float:
        """Degree of parallelism L_total / L_parallel (1.0 for a sequential response; 0-length counts as 1)."""
        return self.total_tokens / self.longest_path_tokens if self.longest_path_tokens else 1.0


def path_lengths(director_tokens: Sequence[int], worker_tokens: Sequence[Sequence[int]]) -> PathLengths:
    """``L_parallel`` and ``L_total`` from segment lengths.

    director_tokens: length of each director segment (a segment after a block counts its ``</spawn_workers>``).
    worker_tokens:   per spawn block, the length of each worker (opener included); a block may be empty when a
                     total budget dropped all its workers.
    """
    assert all(n >= 0 for n in director_tokens) and all(n >= 0 for ws in worker_tokens for n in ws)
    director = sum(director_tokens)
    return PathLengths(
        longest_path_tokens=director + sum(max(ws, default=0) for ws in worker_tokens),
        total_tokens=director + sum(sum(ws) for ws in worker_tokens),
        num_spawn_blocks=len(worker_tokens),
    )


@dataclass
class Budget:
    """Tokens left on the longest path (P) and in total (T, None: unlimited) while a response is built."""

    path_left: int
    total_left: int | None = None

    @classmethod
    def from_config(cls, cfg: DCCoTConfig) -> "Budget":
        return cls(cfg.max_path_tokens, cfg.max_total_tokens)

    def sequential_left(self) -> int:
        """Most tokens a director segment may still take (it counts against both budgets)."""
        return self.path_left if self.total_left is None else min(self.path_left, self.total_left)

    def charge_sequential(self, n: int) -> None:
        assert 0 <= n <= self.sequential_left(), (n, self)
        self.path_left -= n
        if self.total_left is not None:
            self.total_left -= n

    def cut_block(self, worker_tokens: Sequence[int]) -> list[int]:
        """Fit one spawn block's workers into the budgets and charge them; returns the kept length of each worker.

        Every worker is first cut to the path budget (they run side by side); then, in worker order, to what is left
        of the total budget. Workers past the point where the total budget ran out are dropped (not returned), so
        the result may be shorter than the input. Charges ``max`` of the kept lengths to the path budget and their
        sum to the total budget.
        """
        kept: list[int] = []
        total_left = self.total_left
        for n in worker_tokens:
            n = min(n, self.path_left)
            if total_left is not None:
                if total_left == 0:
                    break
                n = min(n, total_left)
                total_left -= n
            kept.append(n)
        self.path_left -= max(kept, default=0)
        self.total_left = total_left
        return kept


def cut_to_budget(
    director_tokens: Sequence[int],
    worker_tokens: Sequence[Sequence[int]],
    max_path_tokens: int,
    max_total_tokens: int | None = None,
) -> tuple[list[int], list[list[int]]]:
    """Cut a finished response's segment lengths so both budgets hold, in reading order (director 0, block 0,
    director 1, ...). Returns the kept ``(director_tokens, worker_tokens)``; segments cut to nothing at the end
    are dropped. The executor applies the same rule while generating (:class:`Budget`)."""
    budget = Budget(max_path_tokens, max_total_tokens)
    directors: list[int] = []
    blocks: list[list[int]] = []
    for k, n in enumerate(director_tokens):
        take = min(n, budget.sequential_left())
        if take == 0 and k > 0:
            break
        budget.charge_sequential(take)
        directors.append(take)
        if take < n or budget.sequential_left() == 0:
            break  # the director was cut or the budget is spent: nothing after it ran
        if k < len(worker_tokens):
            kept = budget.cut_block(worker_tokens[k])
            if not kept:
                break
            blocks.append(kept)
    return directors, blocks


