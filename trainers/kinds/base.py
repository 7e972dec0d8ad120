"""What a rollout kind is: the protocol every kind implements, the batch it hands the learner and the context it
works in.

A kind turns the engines, the reward pool and the prompt sampler into one step's training samples (``collect``) and
measures the policy on held-out data (``evaluate``). The training loop (``trainers.driver``) knows nothing else
about it: single-turn prompts, environment episodes and DC-CoT trajectories are three kinds
(``trainers.kinds``), and a user's kind is a class in a file named by ``kind.path`` (docs/rollout_kinds.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rl.config import Config
from rl.round_robin import deal, interleave
from rl.seeding import stable_seed
from rl.types import PromptItem, RewardResult, Rollout, TrainSample


def request_seed(run_seed: int, step: int, index: int) -> int:
    """Per-request sampling seed: the same (run, step, prompt slot) always samples the same responses."""
    return stable_seed(run_seed, step, index, digest="sha256")


@dataclass
class StepBatch:
    """One step's training data and what the rest of the step needs from its making.

    samples:        what the learner trains on (may be empty: the step then makes no update).
    metrics:        the batch's metrics; ``rollout/tokens`` and ``perf/rollout_s`` are required (throughput).
    rows:           ``samples.jsonl`` rows, at most ``run.log_samples_per_step`` of them.
    feedback:       what step hooks read after the update, by hook name (e.g. GDRO's graded groups).
    engine_version: the policy version the engines served while generating it (set by the batch source).
    """

    samples: list[TrainSample]
    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    feedback: dict[str, Any] = field(default_factory=dict)
    engine_version: int = 0


class RolloutContext:
    """What a kind works with: the config, the engines (through ``generate``/``dispatch``), the reward pool
    (``score``), the prompt sampler, the tokenizer, the held-out items and the learner group (for KL penalties).
    ``gdro`` is the Prompt/Rollout-GDRO controller when enabled (single-turn kinds set per-prompt sample counts and
    sample weights from it). Tests give a kind a subclass with their own ``generate``/``score``."""

    def __init__(self, cfg: Config, *, engines: list, reward_pool, sampler, tokenizer=None, learner=None,
                 eval_items: list[PromptItem] | None = None, benchmarks: dict | None = None, gdro=None) -> None:
        self.cfg = cfg
        self.engines = engines
        self.reward_pool = reward_pool
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.learner = learner
        self.eval_items = eval_items or []
        self.benchmarks = benchmarks or {}
        self.gdro = gdro

    def generate(self, items: list[PromptItem], n: int | list[int], step: int, temperature: float,
                 max_tokens: int, seed_offset: int = 0) -> list[list[Rollout]]:
        """``n`` samples per item (one count for all, or one per item), spread round-robin over the engines;
        groups come back in item order. Request ``i`` is seeded from (run seed, step, seed_offset + i)."""
        from rollout.engine import GenerationRequest, SamplingSettings

        counts = [n] * len(items) if isinstance(n, int) else list(n)
        if len(counts) != len(items):
            raise ValueError(f"got {len(counts)} sample counts for {len(items)} prompts")
        settings = SamplingSettings(temperature=temperature, top_p=self.cfg.rollout.top_p, max_tokens=max_tokens)
        reqs = [
            GenerationRequest(it.id, it.prompt, c, request_seed(self.cfg.run.seed, step, seed_offset + i))
            for i, (it, c) in enumerate(zip(items, counts))
        ]
        return self.dispatch(reqs, settings)

    def dispatch(self, reqs, settings) -> list[list[Rollout]]:
        """Requests round-robin over the engine actors; one group per request, in request order."""
        import ray

        shards = deal(reqs, len(self.engines))
        results = ray.get([e.generate.remote(s, settings) for e, s in zip(self.engines, shards) if s])
        return interleave(results)

    def token_generate_fn(self, settings):
        """``generate_fn(prompt_ids, seeds, max_tokens, stops) -> rollouts`` over the engines, for executors that
        build token-level requests themselves (``rollout.dccot.GenerateFn``)."""
        from rollout.engine import engines_generate_fn

        return engines_generate_fn(self.engines, settings)

    def score(self, items: list[PromptItem], groups: list[list[Rollout]]) -> list[RewardResult]:
        """Every response graded by the reward pool (flat, item-major); each request carries the response's metadata
        (token count, finish reason, prompt id, sample index)."""
        from rewards import reward_request

        return self.grade([reward_request(it, r, j) for it, g in zip(items, groups) for j, r in enumerate(g)])

    def grade(self, requests: list) -> list[RewardResult]:
        """``rewards.RewardRequest``s graded by the reward pool, in order."""
        return self.reward_pool.score(requests)

    def end_evaluation(self) -> None:
        """Grading for an evaluation must not count in the next training step's reward metrics."""
        self.reward_pool.metrics(reset=True)


@runtime_checkable
class RolloutKind(Protocol):
    """A kind of rollout. ``collect`` makes step ``step``'s batch (prompts from ``ctx.sampler``, generation through
    ``ctx.generate``/``ctx.dispatch``, grading through ``ctx.score``, advantages); ``evaluate`` returns held-out
    metrics with at least ``eval/accuracy``. Both are called on the driver, between the engines' syncs."""

    name: str

    def collect(self, ctx: RolloutContext, step: int) -> StepBatch: ...

    def evaluate(self, ctx: RolloutContext, step: int) -> dict[str, float]: ...


def split(flat: list, sizes: list[int]) -> list[list]:
    """Cut a flat list into consecutive chunks of the given sizes."""
    out, start = [], 0
    for n in sizes:
        out.append(flat[start : start + n])
        start += n
    return out


def result_fields(res: RewardResult) -> dict:
    """A graded response's fields in a ``samples.jsonl`` row."""
    return {"reward": res.score, "correct": res.correct, "status": res.status, "error": res.error,
            "components": res.components}
