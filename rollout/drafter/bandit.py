"""How many tokens to draft: a multi-armed bandit per batch-size bucket.

Speculative decoding pays off at small batch sizes (the long tail of a rollout, when most sequences have finished)
and can cost throughput at large ones; the best number of drafted tokens ``K`` also depends on how well the drafter
currently matches the policy. So each batch-size bucket keeps its own bandit over arms ``K`` (``0`` = no speculative
decoding); after a generation round the caller reports a throughput number for the arm it played (accepted or
generated tokens per second), and the bandit favours the arms that gave the most.

Policies (``SpecTokensBanditConfig.policy``):

- ``epsilon_greedy``: with probability ``epsilon`` a uniformly random arm, otherwise the best mean so far;
- ``ucb1``: the arm maximizing ``mean + ucb_c * scale * sqrt(2 ln N / n_arm)`` (Auer et al., 2002), with ``scale``
  the largest reward seen in the bucket, since throughput is not bounded by 1 as UCB1 assumes.

Both play every arm of a bucket once before anything else. ``step_size`` (optional) turns the sample mean into an
exponential recency-weighted mean, for rewards that drift as the drafter and the policy change.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpecTokensBanditConfig:
    arms: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Numbers of speculative tokens to choose from; 0 turns speculative decoding off."""
    batch_size_bounds: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    """Upper bounds (inclusive) of the batch-size buckets; larger batch sizes share the last bucket."""
    policy: str = "ucb1"
    """``ucb1`` or ``epsilon_greedy``."""
    epsilon: float = 0.1
    ucb_c: float = 1.0
    step_size: float | None = None
    """None: sample-mean rewards; a value in (0, 1]: exponential recency-weighted means."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.arms or len(set(self.arms)) != len(self.arms) or min(self.arms) < 0:
            raise ValueError(f"arms must be distinct non-negative token counts, got {self.arms}")
        bounds = self.batch_size_bounds
        if not bounds or bounds[0] < 1 or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"batch_size_bounds must be increasing positive integers, got {bounds}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown bandit policy {self.policy!r}: valid are {sorted(POLICIES)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if self.step_size is not None and not 0.0 < self.step_size <= 1.0:
            raise ValueError(f"step_size must be in (0, 1] or None, got {self.step_size}")


@dataclass
class ArmStats:
    """Per bucket, per arm (lists indexed like ``SpecTokensBanditConfig.arms``)."""

    counts: list[int]
    means: list[float]
    max_reward: float = 0.0

    @classmethod
    def empty(cls, num_arms: int) -> ArmStats:
        return cls(counts=[0] * num_arms, means=[0.0] * num_arms)


PolicyFn = Callable[[ArmStats, SpecTokensBanditConfig, random.Random], int]
"""``policy(stats, config, rng) -> arm index`` for a bucket whose arms have all been played at least once."""


def _epsilon_greedy(stats: ArmStats, cfg: SpecTokensBanditConfig, rng: random.Random) -> int:
    if rng.random() < cfg.epsilon:
        return rng.randrange(len(stats.counts))
    return max(range(len(stats.means)), key=lambda i: stats.means[i])


def _ucb1(stats: ArmStats, cfg: SpecTokensBanditConfig, rng: random.Random) -> int:
    total = sum(stats.counts)
    scale = stats.max_reward if stats.max_reward > 0 else 1.0
    return max(range(len(stats.means)), key=lambda i: stats.means[i]
               + cfg.ucb_c * scale * math.sqrt(2.0 * math.log(total) / stats.counts[i]))


POLICIES: dict[str, PolicyFn] = {"epsilon_greedy": _epsilon_greedy, "ucb1": _ucb1}


class SpecTokensBandit:
    """``choose(batch_size) -> K``; ``update(batch_size, K, reward)`` after the round that used it."""

    def __init__(self, config: SpecTokensBanditConfig | None = None) -> None:
        self.config = config or SpecTokensBanditConfig()
        self.rng = random.Random(self.config.seed)
        self.buckets = [ArmStats.empty(len(self.config.arms)) for _ in self.config.batch_size_bounds]

    def bucket(self, batch_size: int) -> int:
        """Index of the bucket holding ``batch_size`` (the first bound >= it; the last bucket beyond)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return min(bisect.bisect_left(self.config.batch_size_bounds, batch_size),
                   len(self.config.batch_size_bounds) - 1)

    def choose(self, batch_size: int) -> int:
        """The number of speculative tokens to use for a round at ``batch_size``."""
        stats = self.buckets[self.bucket(batch_size)]
        untried = [i for i, n in enumerate(stats.counts) if n == 0]
        arm = untried[0] if untried else POLICIES[self.config.policy](stats, self.config, self.rng)
        return self.config.arms[arm]

    def update(self, batch_size: int, num_speculative_tokens: int, reward: float) -> None:
        """Record ``reward`` (a throughput: larger is better) for ``num_speculative_tokens`` at ``batch_size``."""
        if num_speculative_tokens not in self.config.arms:
            raise ValueError(f"{num_speculative_tokens} is not an arm: arms are {list(self.config.arms)}")
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}")
        stats = self.buckets[self.bucket(batch_size)]
        i = self.config.arms.index(num_speculative_tokens)
        stats.counts[i] += 1
        rate = 1.0 / stats.counts[i] if self.config.step_size is None else self.config.step_size
        if stats.counts[i] == 1:
            rate = 1.0  # the first reward is the estimate, with or without recency weighting
        stats.means[i] += rate * (reward - stats.means[i])
        stats.max_reward = max(stats.max_reward, abs(reward))

    def best(self, batch_size: int) -> int:
        """The arm with the best mean reward in ``batch_size``'s bucket (no exploration; untried arms lose; in a
        bucket with no rewards yet, the smallest arm: speculative decoding off when 0 is an arm)."""
        stats = self.buckets[self.bucket(batch_size)]
        tried = [i for i, n in enumerate(stats.counts) if n > 0]
        if not tried:
            return min(self.config.arms)
        return self.config.arms[max(tried, key=lambda i: stats.means[i])]

    def schedule(self, max_batch_size: int) -> list[tuple[int, int, int]]:
        """The best arms as vLLM's ``speculative_config["num_speculative_tokens_per_batch_size"]``: inclusive
        ``(first batch size, last batch size, K)`` ranges covering ``1..max_batch_size``."""
        return [(lo, hi, self.best(lo)) for lo, hi in self.bucket_ranges(max_batch_size)]

    def bucket_ranges(self, max_batch_size: int) -> list[tuple[int, int]]:
        """The buckets as inclusive batch-size ranges covering ``1..max_batch_size`` (the last bucket takes
        everything above the second-to-last bound)."""
        out: list[tuple[int, int]] = []
        lo = 1
        bounds = self.config.batch_size_bounds
        for bound in bounds:
            if lo > max_batch_size:
                break
            hi = max_batch_size if bound == bounds[-1] else min(bound, max_batch_size)
            out.append((lo, hi))
            lo = hi + 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "arms": list(self.config.arms),
            "batch_size_bounds": list(self.config.batch_size_bounds),
            "buckets": [{"counts": list(s.counts), "means": list(s.means), "max_reward": s.max_reward}
                        for s in self.buckets],
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s counts, means and random state; the arms and buckets must be the same."""
        if (list(state["arms"]) != list(self.config.arms)
                or list(state["batch_size_bounds"]) != list(self.config.batch_size_bounds)):
            raise ValueError(f"bandit state has arms {state['arms']} and buckets {state['batch_size_bounds']}; "
                             f"this bandit has {list(self.config.arms)} and {list(self.config.batch_size_bounds)}")
        self.buckets = [ArmStats(counts=list(b["counts"]), means=list(b["means"]), max_reward=b["max_reward"])
                        for b in state["buckets"]]
        rng_state = state["rng"]
        # JSON round trips turn the state's inner tuple into a list.
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
