"""DAPO's dynamic sampling, written once for every kind that grades groups of responses: rounds of prompts until
enough groups pass the kind's filter (docs/algorithms.md, "DAPO")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from rl.config import DynamicSamplingConfig
from rl.types import PromptItem

G = TypeVar("G")


def fill_batch(sampler, ds: DynamicSamplingConfig, target: int,
               play_round: Callable[[list[PromptItem], int], Iterable[tuple[G, bool]]]) -> tuple[list[G], dict]:
    """Up to ``target`` kept groups and dynamic sampling's metrics (none when it is off).

    Off: one round of ``target`` prompts, every group kept. On: rounds of ``prompts_per_round`` prompts (``target``
    when unset); ``play_round(items, offset)`` generates and grades one round (``offset``: the round's first prompt
    slot, for seeding) and yields ``(group, keep)`` per prompt; rounds continue until ``target`` groups are kept or
    ``max_rounds`` is reached, and the batch is cut to exactly ``target`` groups."""
    per_round = (ds.prompts_per_round or target) if ds.enabled else target
    kept: list[G] = []
    rounds = generated = dropped = 0
    for rnd in range(ds.max_rounds if ds.enabled else 1):
        rounds += 1
        items = sampler.next(per_round)
        for group, keep in play_round(items, rnd * per_round):
            if not ds.enabled or keep:
                kept.append(group)
            else:
                dropped += 1
        generated += len(items)
        if len(kept) >= target:
            break
    kept = kept[:target]
    if not ds.enabled:
        return kept, {}
    return kept, {
        "dapo/gen_rounds": float(rounds),
        "dapo/prompts_generated": float(generated),
        "dapo/filtered_group_frac": dropped / max(generated, 1),
        "dapo/batch_fill_frac": len(kept) / target,
    }

