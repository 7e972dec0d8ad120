"""Core records passed between the driver, the engines, the reward pool and the learner.

Plain dataclasses with shapes in the docstrings. They carry no behaviour beyond small derived
properties, so every layer can import them (``rl.types`` sits at the bottom of the import graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptItem:
    """One problem of a dataset.

    id:       stable identifier (unique within its dataset); used as the group id of its samples.
    prompt:   the text given to the model (already formatted: chat template or plain prompt).
    answer:   the gold answer as text (e.g. ``"68"``, ``"\\frac{1}{2}"``).
    metadata: free-form extras from the data row (``source``, ``level``, ``subject``...).
    """

    id: str
    prompt: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """One sampled response to one prompt.

    prompt_token_ids:   [P] token ids of the prompt as the engine saw them.
    response_token_ids: [R] sampled token ids (R >= 0).
    logprobs:           [R] behaviour log-probs of the sampled tokens, after temperature
                        (vLLM ``processed_logprobs``).
    finish_reason:      ``"stop"`` (EOS or stop string) or ``"length"`` (hit max tokens).
    policy_version:     weight version of the engine that produced it.
    """

    prompt_id: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int
    response_text: str = ""

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_token_ids)


@dataclass
class RewardResult:
    """Outcome of grading one response.

    score:     scalar reward used for training (0.0 on any failure: fail closed).
    correct:   verifier verdict (False on any failure).
    extracted: the answer text extracted from the response, or None when nothing parsed.
    status:    ``"ok"``, ``"parse_fail"``, ``"timeout"`` or ``"error"``.
    error:     message when status is ``"error"`` or ``"timeout"``.
    time_s:    wall time spent grading, seconds.
    components: per-reward-function scores when several rewards are combined (name -> score).
    """

    score: float
    correct: bool
    extracted: str | None = None
    status: str = "ok"
    error: str | None = None
    time_s: float = 0.0
    components: dict[str, float] = field(default_factory=dict)


STATUSES = ("ok", "parse_fail", "timeout", "error")


@dataclass
class TrainSample:
    """One response prepared for the learner.

    prompt_token_ids:   [P] prompt ids (context only; never trained on).
    response_token_ids: [R] sampled ids (trained on where ``loss_mask`` is 1).
    behaviour_logprobs: [R] log-probs under the policy that sampled them (engine, after temperature).
    advantage:          scalar advantage of the whole response (broadcast to its tokens by the learner).
    loss_mask:          [R] 1 for tokens the policy generated, 0 for injected ones (None: all ones).
    group_id:           prompt id; samples of one prompt form a group.
    """

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    behaviour_logprobs: list[float]
    advantage: float
    group_id: str
    loss_mask: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.response_token_ids)
