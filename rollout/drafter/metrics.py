"""vLLM's speculative-decoding counters and the acceptance numbers derived from them.

With stats logging on (``disable_log_stats=False``), ``LLM.get_metrics()`` holds the cumulative counters
``vllm:spec_decode_num_drafts`` (drafting rounds, one per request per decode step),
``vllm:spec_decode_num_draft_tokens``, ``vllm:spec_decode_num_accepted_tokens`` and the vector
``vllm:spec_decode_num_accepted_tokens_per_pos`` (accepted tokens at draft position 0, 1, ...). Each round
yields its accepted drafts plus one token from the target, so the mean acceptance length (tokens per target
forward) is ``1 + accepted / drafts``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_DRAFTS = "vllm:spec_decode_num_drafts"
_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass(frozen=True)
class SpecDecodeCounters:
    """Counts over a period (cumulative from ``from_metrics``; a period from ``minus``)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_metrics(cls, metrics: Iterable[Any]) -> SpecDecodeCounters:
        """From ``LLM.get_metrics()`` (summed over label sets: engines of one process add up)."""
        drafts = draft_tokens = accepted = 0
        per_pos: list[int] = []
        for m in metrics:
            if m.name == _DRAFTS:
                drafts += int(m.value)
            elif m.name == _DRAFT_TOKENS:
                draft_tokens += int(m.value)
            elif m.name == _ACCEPTED:
                accepted += int(m.value)
            elif m.name == _PER_POS:
                values = [int(v) for v in m.values]
                per_pos += [0] * (len(values) - len(per_pos))
                for i, v in enumerate(values):
                    per_pos[i] += v
        return cls(drafts, draft_tokens, accepted, tuple(per_pos))

    def _combine(self, other: SpecDecodeCounters, sign: int) -> SpecDecodeCounters:
        n = max(len(self.accepted_per_position), len(other.accepted_per_position))
        a = list(self.accepted_per_position) + [0] * (n - len(self.accepted_per_position))
        b = list(other.accepted_per_position) + [0] * (n - len(other.accepted_per_position))
        return SpecDecodeCounters(
            self.num_drafts + sign * other.num_drafts,
            self.num_draft_tokens + sign * other.num_draft_tokens,
            self.num_accepted_tokens + sign * other.num_accepted_tokens,
            tuple(x + sign * y for x, y in zip(a, b)),
        )

    def minus(self, earlier: SpecDecodeCounters) -> SpecDecodeCounters:
        """Counts between ``earlier`` and ``self``."""
        return self._combine(earlier, -1)

    def plus(self, other: SpecDecodeCounters) -> SpecDecodeCounters:
        """Counts of both (e.g. two engines over the same period)."""
        return self._combine(other, 1)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per drafting round, ``1 + accepted / drafts`` (nan without drafts)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted share of drafted tokens (nan without drafts)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else float("nan")

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        """Share of rounds whose draft at position ``i`` was accepted."""
        return [a / self.num_drafts if self.num_drafts else float("nan") for a in self.accepted_per_position]

    def as_metrics(self, prefix: str = "rollout/spec_decode/") -> dict[str, float]:
        out = {
            f"{prefix}num_drafts": float(self.num_drafts),
            f"{prefix}num_draft_tokens": float(self.num_draft_tokens),
            f"{prefix}num_accepted_tokens": float(self.num_accepted_tokens),
            f"{prefix}mean_acceptance_length": self.mean_acceptance_length,
            f"{prefix}acceptance_rate": self.acceptance_rate,
        }
        for i, r in enumerate(self.acceptance_rate_per_position):
            out[f"{prefix}acceptance_rate_pos{i}"] = r
        return out
