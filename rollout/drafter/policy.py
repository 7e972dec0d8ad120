"""When to speculate and how many tokens: the rollout side of the adaptive drafter.

``SpecPolicy`` turns the ``drafter`` config section into the ``batch size -> K`` schedule the engines run
(``Engine.set_spec_schedule``), and learns from the engines' per-step statistics (``Engine.spec_step_stats``:
decode steps, tokens produced and seconds, per running batch size and K):

- ``fixed``: K = ``num_speculative_tokens`` at running batch sizes up to ``long_tail_threshold``, 0 above it.
- ``adaptive``: at or below the threshold, a ``SpecTokensBandit`` picks K per batch-size bucket (arms may include
  0, i.e. no speculation) and is rewarded with the bucket's measured per-sequence decoding speed (tokens each
  running sequence gained per second of decode step) for the K it ran; above the threshold, K = 0 (large batches
  are compute-bound: drafting costs more than it saves).

``phase_metrics`` splits a generation's decode steps into the long tail (running batch at or below the threshold)
and the bulk, with tokens/s with and without speculation in each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rollout.drafter.bandit import SpecTokensBandit, SpecTokensBanditConfig


@dataclass(frozen=True)
class StepRow:
    """Decode steps an engine ran at one running batch size with one K."""

    batch_size: int
    k: int
    steps: float
    tokens: float
    seconds: float

    @classmethod
    def parse(cls, row: Sequence[float]) -> StepRow:
        b, k, steps, tokens, seconds = row
        return cls(int(b), int(k), float(steps), float(tokens), float(seconds))


def merge_rows(per_engine: Iterable[Iterable[Sequence[float]]]) -> list[StepRow]:
    """The engines' ``spec_step_stats`` lists, summed per (batch size, K)."""
    acc: dict[tuple[int, int], list[float]] = {}
    for rows in per_engine:
        for raw in rows:
            r = StepRow.parse(raw)
            cur = acc.setdefault((r.batch_size, r.k), [0.0, 0.0, 0.0])
            cur[0] += r.steps
            cur[1] += r.tokens
            cur[2] += r.seconds
    return [StepRow(b, k, *v) for (b, k), v in sorted(acc.items())]


def phase_metrics(rows: Sequence[StepRow], long_tail_threshold: int | None, num_engines: int = 1,
                  prefix: str = "rollout/spec/") -> dict[str, float]:
    """Decode time and throughput in the long tail (batch size <= threshold; every batch size when None) and the
    bulk, with (K > 0) and without (K = 0) speculation; ``long_tail_s`` is the long tail's decode seconds per
    engine (the rows sum ``num_engines`` engines). Keys with no steps behind them are left out."""
    total_s = sum(r.seconds for r in rows)
    out: dict[str, float] = {f"{prefix}decode_s": total_s}
    if total_s <= 0:
        return out
    tail = [r for r in rows if long_tail_threshold is None or r.batch_size <= long_tail_threshold]
    tail_s = sum(r.seconds for r in tail)
    out[f"{prefix}long_tail_time_frac"] = tail_s / total_s
    out[f"{prefix}long_tail_s"] = tail_s / max(num_engines, 1)
    for phase, members in (("long_tail", tail), ("bulk", [r for r in rows if r not in tail])):
        for label, sel in (("sd", [r for r in members if r.k > 0]), ("no_sd", [r for r in members if r.k == 0])):
            secs = sum(r.seconds for r in sel)
            if secs > 0:
                out[f"{prefix}{phase}_tokens_per_s_{label}"] = sum(r.tokens for r in sel) / secs
                out[f"{prefix}{phase}_steps_{label}"] = sum(r.steps for r in sel)
    tokens = sum(r.tokens for r in rows)
    steps = sum(r.steps for r in rows)
    out[f"{prefix}tokens_per_step"] = tokens / steps if steps else 0.0
    return out


class SpecPolicy:
    """The schedule for ``mode`` in ``fixed`` / ``adaptive`` (see the module docstring).

    num_speculative_tokens: the engines' K (the most any schedule can use).
    long_tail_threshold:    running batch sizes up to it may speculate; None: all. In adaptive mode it must be one
                            of the bandit's bucket bounds, so no bucket straddles it.
    max_batch_size:         the engines' ``max_num_seqs`` (the schedule covers 1..it).
    min_seconds:            a (bucket, K) pair's decode time below this in one observation is too noisy to learn
                            from and is not fed to the bandit.
    """

    def __init__(self, mode: str, num_speculative_tokens: int, long_tail_threshold: int | None,
                 bandit: SpecTokensBanditConfig | None = None, max_batch_size: int = 256,
                 min_seconds: float = 0.0) -> None:
        if mode not in ("fixed", "adaptive"):
            raise ValueError(f"SpecPolicy mode must be fixed or adaptive, got {mode!r}")
        self.mode = mode
        self.k = int(num_speculative_tokens)
        self.threshold = long_tail_threshold
        self.max_batch_size = int(max_batch_size)
        self.min_seconds = float(min_seconds)
        self.bandit = SpecTokensBandit(bandit) if mode == "adaptive" else None
        if self.bandit is not None:
            arms, bounds = self.bandit.config.arms, self.bandit.config.batch_size_bounds
            if max(arms) > self.k:
                raise ValueError(f"bandit arms {list(arms)} exceed num_speculative_tokens={self.k}, the engines' most")
            if long_tail_threshold is not None and long_tail_threshold not in bounds:
                raise ValueError(f"long_tail_threshold={long_tail_threshold} must be one of the bucket bounds "
                                 f"{list(bounds)} (so that no bucket straddles it)")
        self.current: list[tuple[int, int, int]] = []

    def buckets(self) -> list[tuple[int, int]]:
        """Inclusive batch-size ranges covering 1..max_batch_size: the bandit's buckets (adaptive), or the long
        tail and the rest (fixed)."""
        if self.bandit is None:
            t = self.threshold
            if t is None or t >= self.max_batch_size:
                return [(1, self.max_batch_size)]
            return [(1, t), (t + 1, self.max_batch_size)]
        return self.bandit.bucket_ranges(self.max_batch_size)

    def in_long_tail(self, lo: int) -> bool:
        return self.threshold is None or lo <= self.threshold

    def startup_schedule(self) -> list[tuple[int, int, int]]:
        """The schedule an engine starts with: every K this policy can choose (the bandit's arms, or K) runs at
        least at one batch size in the last ``len(Ks)`` sizes of the long tail, the largest K at its top, so an
        engine that captures CUDA graphs per K (vLLM's Model Runner V2) captures each K up to about the widest long-tail
        batch. Batch sizes past the long tail draft nothing. Not used for decoding: ``next_schedule`` replaces it
        once the engines are up."""
        top = min(self.threshold or self.max_batch_size, self.max_batch_size)
        ks = sorted(set(self.bandit.config.arms) if self.bandit is not None else {self.k})
        ks = ks[-top:]  # a long tail shorter than the number of Ks keeps the largest
        first_solo = top - len(ks) + 2  # ks[1:] take one batch size each, ending at `top`
        sched = [(1, first_solo - 1, ks[0])]
        sched += [(first_solo + i, first_solo + i, k) for i, k in enumerate(ks[1:])]
        if top < self.max_batch_size:
            sched.append((top + 1, self.max_batch_size, 0))
        return sched

    def next_schedule(self) -> list[tuple[int, int, int]]:
        """The schedule for the next generation (adaptive: the bandit's choice per long-tail bucket, exploring)."""
        sched = []
        for lo, hi in self.buckets():
            if not self.in_long_tail(lo):
                k = 0
            elif self.bandit is None:
                k = self.k
            else:
                k = self.bandit.choose(lo)
            sched.append((lo, hi, k))
        self.current = sched
        return sched

    def observe(self, rows: Sequence[StepRow]) -> dict[str, float]:
        """Feed a generation's step statistics to the bandit (adaptive mode): per long-tail bucket and K, reward
        = each sequence's decoding speed, sum over batch sizes b of tokens_b / b, over the seconds of those steps.
        In the long tail a decode step costs about the same at every small batch size, so total tokens/s grows
        with the batch size the arm happened to run at; per-sequence speed compares arms played at different
        batch sizes of one bucket fairly (at one batch size both rank the arms alike), and it is what sets how
        fast the tail's last sequences finish. Returns ``rollout/spec/k_<lo>_<hi>`` (the K each bucket ran) and
        the rewards given."""
        out: dict[str, float] = {f"rollout/spec/k_{lo}_{hi}": float(k) for lo, hi, k in self.current}
        if self.bandit is None:
            return out
        for lo, hi in self.buckets():
            if not self.in_long_tail(lo):
                continue
            per_k: dict[int, list[float]] = {}
            for r in rows:
                if lo <= r.batch_size <= hi and r.k in self.bandit.config.arms:
                    acc = per_k.setdefault(r.k, [0.0, 0.0])
                    acc[0] += r.tokens / max(r.batch_size, 1)  # per running sequence
                    acc[1] += r.seconds
            for k, (tokens_per_seq, secs) in per_k.items():
                if secs > self.min_seconds:
                    reward = tokens_per_seq / secs
                    self.bandit.update(lo, k, reward)
                    out[f"rollout/spec/reward_{lo}_{hi}_k{k}"] = reward
        return out

    def state_dict(self) -> dict:
        return {"current": [list(r) for r in self.current],
                "bandit": self.bandit.state_dict() if self.bandit is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """An adaptive policy takes the bandit's state and the schedule it had chosen; a fixed one has nothing to
        restore (so a run may resume in another mode)."""
        if self.bandit is not None and state.get("bandit") is not None:
            self.bandit.load_state_dict(state["bandit"])
            self.current = [tuple(r) for r in state.get("current", [])]
