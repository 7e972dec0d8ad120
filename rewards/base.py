"""Reward records, the reward-function protocol and the registry of built-in rewards.

A reward function grades one response. Every reward, built-in or plug-in, has the same signature::

    fn(prompt: str, response: str, answer: str, metadata: dict, **kwargs) -> RewardResult | float | bool

``kwargs`` are the ``RewardSpec.kwargs`` of the configured reward. The function may be ``async def``.
A plain float or bool return is wrapped into a :class:`rl.types.RewardResult` by :func:`call_reward`.
Nothing here imports torch, sympy or math-verify, so the driver can validate reward specs cheaply.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Union

from rl.registry import Registry
from rl.types import STATUSES, PromptItem, RewardResult, Rollout

RewardReturn = Union[RewardResult, float, int, bool]


@dataclass(frozen=True)
class RewardRequest:
    """One response to grade.

    prompt:   the prompt text the model saw.
    response: the model's full response text (may contain ``<think>`` blocks).
    answer:   the gold answer as text (e.g. ``"68"``, ``"\\frac{1}{2}"``, ``"$[2,5)$"``).
    metadata: extras passed through to every reward function: in a run, the prompt item's own metadata plus
              ``REQUEST_METADATA_KEYS`` (see :func:`reward_request`).
    """

    prompt: str
    response: str
    answer: str
    metadata: dict = field(default_factory=dict)


@dataclass
class RewardSpec:
    """One configured reward.

    name:   a registered name (``"math_verify"``), ``"package.module:function"`` or
            ``"path/to/file.py:function"`` (loaded from exactly that path).
    weight: multiplier of this reward's score in the combined score.
    kwargs: keyword arguments passed to the reward function on every call.
    """

    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(
                f"RewardSpec.name must be a non-empty string, got {self.name!r}; use a registered name "
                "such as 'math_verify', 'package.module:function' or 'path/to/file.py:function'"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"RewardSpec {self.name!r}: weight must be a finite number, got {self.weight!r}")
        if not isinstance(self.kwargs, dict):
            raise ValueError(
                f"RewardSpec {self.name!r}: kwargs must be a dict of keyword arguments, got {type(self.kwargs).__name__}"
            )


class RewardFn(Protocol):
    """What every reward function looks like (sync or ``async def``)."""

    def __call__(
        self, prompt: str, response: str, answer: str, metadata: dict, **kwargs: Any
    ) -> RewardReturn | Awaitable[RewardReturn]: ...


@dataclass(frozen=True)
class RewardEntry:
    """A loaded reward function with its declared capabilities.

    name:        the name used in metrics (``reward/<name>/...``) and in ``RewardResult.components``.
    fn:          the function, called as ``fn(prompt, response, answer, metadata, **kwargs)``.
    is_verifier: it returns a verdict (``correct``) on the gold answer; the pool takes ``correct`` from the
                 first verifier and audits its "incorrect" verdicts.
    description: one line for ``rl verify --help`` and error messages.
    check_kwargs: optional; raises ValueError on bad ``RewardSpec.kwargs`` (run before any worker starts).
    self_test:    optional; raises AssertionError when the reward is broken in this environment (e.g. a
                  LaTeX parser that parses nothing); run in every worker at start-up.
    """

    name: str
    fn: Callable[..., Any]
    is_verifier: bool = False
    description: str = ""
    check_kwargs: Callable[[dict], None] | None = None
    self_test: Callable[[], None] | None = None


# Registered reward functions, their RewardEntry fields as capabilities; filled by @register_reward in
# rewards.builtin, rewards.math_verifier and rewards.dccot.
REWARD_REGISTRY: Registry[Callable[..., Any]] = Registry(
    "reward", capabilities={"is_verifier": False, "description": "", "check_kwargs": None, "self_test": None}
)


def register_reward(
    name: str,
    *,
    is_verifier: bool = False,
    description: str = "",
    check_kwargs: Callable[[dict], None] | None = None,
    self_test: Callable[[], None] | None = None,
) -> Callable:
    """Decorator: register ``fn`` under ``name`` so configs can refer to it by name (see RewardEntry)."""
    return REWARD_REGISTRY.register(
        name, is_verifier=is_verifier, description=description, check_kwargs=check_kwargs, self_test=self_test
    )


def registered_reward(name: str) -> RewardEntry:
    """The :class:`RewardEntry` of a registered reward (``ValueError`` listing the valid names if unknown)."""
    return RewardEntry(name=name, fn=REWARD_REGISTRY.get(name), **REWARD_REGISTRY.capabilities(name))


def failed_result(status: str, error: str, time_s: float = 0.0, extracted: str | None = None) -> RewardResult:
    """A fail-closed result: score 0, not correct, with the reason."""
    assert status in STATUSES and status != "ok", status
    return RewardResult(score=0.0, correct=False, extracted=extracted, status=status, error=error, time_s=time_s)


def to_reward_result(value: Any, time_s: float) -> RewardResult:
    """Wrap what a reward function returned into a validated ``RewardResult`` (fail closed on anything odd).

    bool -> score 1.0/0.0 and ``correct`` = the bool; int/float -> score, ``correct`` = score > 0;
    ``RewardResult`` -> kept, with ``time_s`` filled. NaN/inf scores and unknown types become ``status="error"``.
    """
    if isinstance(value, RewardResult):
        if value.status not in STATUSES:
            return failed_result("error", f"reward returned unknown status {value.status!r}; use one of {STATUSES}", time_s)
        if not isinstance(value.score, (int, float)) or isinstance(value.score, bool) or not math.isfinite(value.score):
            return failed_result("error", f"reward returned a non-finite or non-numeric score {value.score!r}", time_s)
        if value.status != "ok" and (value.score != 0.0 or value.correct):
            # Failures must fail closed, whatever the plug-in says.
            value.score, value.correct = 0.0, False
        value.score = float(value.score)
        value.time_s = time_s
        return value
    if isinstance(value, bool):
        return RewardResult(score=float(value), correct=value, time_s=time_s)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return failed_result("error", f"reward returned a non-finite score {value!r}", time_s)
        return RewardResult(score=float(value), correct=value > 0, time_s=time_s)
    return failed_result(
        "error", f"reward returned {type(value).__name__}; return a float, a bool or a rl.types.RewardResult", time_s
    )


_EVENT_LOOP: asyncio.AbstractEventLoop | None = None


def _run_awaitable(awaitable: Awaitable) -> Any:
    # One loop per process, reused: plug-ins may cache clients bound to the loop.
    global _EVENT_LOOP
    if _EVENT_LOOP is None or _EVENT_LOOP.is_closed():
        _EVENT_LOOP = asyncio.new_event_loop()
    return _EVENT_LOOP.run_until_complete(awaitable)


def call_reward(entry: RewardEntry, request: RewardRequest, kwargs: dict | None = None) -> RewardResult:
    """Call one reward function on one request, in this process, and never raise.

    Exceptions become ``status="error"`` results (fail closed). There is no timeout here: the pool enforces
    wall-clock limits from outside the process that runs this.
    """
    start = time.perf_counter()
    try:
        value = entry.fn(request.prompt, request.response, request.answer, request.metadata, **(kwargs or {}))
        if inspect.isawaitable(value):
            value = _run_awaitable(value)
    except Exception as exc:  # untrusted plug-in code: fail closed and report, never crash the worker
        return failed_result("error", f"{type(exc).__name__}: {shorten(str(exc))}", time.perf_counter() - start)
    return to_reward_result(value, time.perf_counter() - start)


def shorten(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


# The keys every graded response of a run carries in ``RewardRequest.metadata`` (docs/rewards.md lists them);
# DC-CoT trajectories add ``longest_path_tokens`` and ``num_spawn_blocks``.
REQUEST_METADATA_KEYS = ("prompt_id", "sample_index", "num_response_tokens", "finish_reason")


def reward_request(item: PromptItem, response: Any, sample_index: int) -> RewardRequest:
    """The request that grades one sampled response to ``item``: what training, in-training evaluation and
    ``rl eval`` all send, so the metadata a reward reads is the same everywhere.

    response:     an ``rl.types.Rollout``, or a DC-CoT ``rollout.dccot.Trajectory`` (anything with
                  ``response_text``, ``end_reason`` and ``reward_metadata()``).
    sample_index: the response's index among the samples of ``item`` (0-based).

    ``metadata`` is the item's metadata, then ``prompt_id`` (``item.id``), ``sample_index``,
    ``num_response_tokens`` (sampled tokens; a trajectory's total) and ``finish_reason`` (``"stop"``, or
    ``"length"`` when the response was cut at a token budget; for a trajectory, any end but ``"stop"``),
    then a trajectory's path lengths.
    """
    if isinstance(response, Rollout):
        num_tokens, finish_reason, extra = response.num_response_tokens, response.finish_reason, {}
    else:
        extra = dict(response.reward_metadata())
        num_tokens = extra.pop("num_response_tokens")
        finish_reason = "stop" if response.end_reason == "stop" else "length"
    metadata = {
        **item.metadata,
        "prompt_id": item.id,
        "sample_index": int(sample_index),
        "num_response_tokens": int(num_tokens),
        "finish_reason": finish_reason,
        **extra,
    }
    return RewardRequest(item.prompt, response.response_text, item.answer, metadata)


# The fixed tiny example every configured reward is smoke-called on at start-up, built like a run's requests so
# that it carries exactly the metadata keys a run sends (a reward that reads one of them works in both).
SMOKE_REQUEST = reward_request(
    PromptItem(id="smoke-test", prompt="What is 1 + 1?", answer="2"),
    Rollout(
        prompt_id="smoke-test",
        prompt_token_ids=[0] * 8,
        response_token_ids=[0] * 24,
        logprobs=[0.0] * 24,
        finish_reason="stop",
        policy_version=0,
        response_text="<think>1 + 1 = 2.</think>Adding the numbers gives 2, so the answer is $\\boxed{2}$.",
    ),
    sample_index=0,
)
