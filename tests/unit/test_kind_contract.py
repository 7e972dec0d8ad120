"""Every rollout kind, registered or loaded by path, keeps the contract the training loop relies on: ``collect``
returns a ``StepBatch`` of well-formed learner samples with finite metrics (the throughput keys included) and at most
``run.log_samples_per_step`` JSON rows; the same context state gives the same batch; ``evaluate`` returns
``eval/accuracy`` in [0, 1]. Run in a fake context whose generation and grading are deterministic functions (the
real engines: tests/integration)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rl.config import ConfigError, load_config
from rl.data.datasets import PromptSampler
from rl.seeding import stable_seed
from rl.types import PromptItem, RewardResult, Rollout, TrainSample
from trainers.kinds import KINDS, make_kind
from trainers.kinds.base import RolloutContext, RolloutKind, StepBatch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "docs/examples/retry_kind.py:Retry"


class CharTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def right(key: str, seed: int) -> bool:
    """Whether the fake policy answers this request right: a fixed coin per (prompt, seed)."""
    return stable_seed(key, seed) % 3 == 0


class FakeContext(RolloutContext):
    """Generation answers ``it.answer`` or ``"wrong"`` by a fixed coin per request; grading compares texts."""

    def generate(self, items, n, step, temperature, max_tokens, seed_offset=0):
        counts = [n] * len(items) if isinstance(n, int) else n
        out = []
        for i, (it, c) in enumerate(zip(items, counts)):
            seed = stable_seed(self.cfg.run.seed, step, seed_offset + i)
            out.append([self.rollout(it.id, it.prompt, f"answer {it.answer if right(it.id, seed + j) else 'wrong'}")
                        for j in range(c)])
        return out

    def dispatch(self, reqs, settings):
        return [[self.rollout(r.prompt_id, r.prompt, "1" if right(r.prompt_id, r.seed + j) else "x")
                 for j in range(r.n)] for r in reqs]

    def token_generate_fn(self, settings):
        def generate_fn(prompts, seeds, max_tokens, stops):
            text = "<answer>3</answer>"
            return [Rollout("t", list(p), [ord(c) for c in text][:m], [-0.5] * min(len(text), m), "stop", 0, text)
                    for p, m in zip(prompts, max_tokens)]
        return generate_fn

    def grade(self, requests):
        return [RewardResult(score=float(r.answer in r.response), correct=r.answer in r.response) for r in requests]

    def end_evaluation(self) -> None:
        pass

    @staticmethod
    def rollout(pid: str, prompt: str, text: str) -> Rollout:
        return Rollout(pid, [ord(c) for c in prompt[:8]], [ord(c) for c in text], [-0.5] * len(text), "stop", 0, text)


def context(cfg) -> FakeContext:
    items = [PromptItem(f"p{i}", f"Compute {i} + 1.", str(i + 1)) for i in range(12)]
    return FakeContext(cfg, engines=[], reward_pool=None, sampler=PromptSampler(items, seed=0),
                       tokenizer=CharTokenizer(), eval_items=items[:4])


CASES = {
    "single_turn": ["rollout.prompts_per_step=4", "rollout.num_samples_per_prompt=4"],
    "single_turn_dapo": ["rollout.prompts_per_step=4", "rollout.num_samples_per_prompt=4",
                         "rollout.dynamic_sampling.enabled=true", "rollout.dynamic_sampling.max_rounds=2"],
    "episodes": ["kind.name=episodes", "kind.env=number_target", "kind.groups_per_step=2", "kind.group_size=3",
                 "kind.max_turns=2", "kind.eval_groups=2"],
    "dccot": ["kind.name=dccot", "kind.max_spawn_blocks=1", "kind.max_worker_tokens=8", "kind.max_path_tokens=48",
              "kind.max_total_tokens=64",
              "rollout.prompts_per_step=2", "rollout.num_samples_per_prompt=2", "rollout.max_model_len=256"],
    "plugin": ["kind.name=plugin", f"kind.path={EXAMPLE}", "rollout.prompts_per_step=4",
               "rollout.num_samples_per_prompt=2"],
}


def test_every_registered_kind_has_a_case():
    assert set(KINDS.names()) <= {c.split("_dapo")[0] for c in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kind_contract(case, tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.log_samples_per_step=3", *CASES[case]])
    kind = make_kind(cfg)
    assert isinstance(kind, RolloutKind)
    batch = kind.collect(context(cfg), step=1)
    assert isinstance(batch, StepBatch) and batch.samples
    for s in batch.samples:
        assert isinstance(s, TrainSample) and s.response_token_ids and s.prompt_token_ids
        assert len(s.behaviour_logprobs) == len(s.response_token_ids)
        assert s.loss_mask is None or len(s.loss_mask) == len(s.response_token_ids)
        assert math.isfinite(s.advantage)
    assert {"rollout/tokens", "perf/rollout_s"} <= set(batch.metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in batch.metrics.values()), batch.metrics
    # every generated token counts, kept or not (a trajectory's tokens are counted once, not per trained thread)
    assert batch.metrics["rollout/tokens"] >= sum(len(s.response_token_ids) for s in batch.samples) or case == "dccot"
    assert 0 < len(batch.rows) <= 3 and json.loads(json.dumps(batch.rows)) == batch.rows
    again = kind.collect(context(cfg), step=1)  # the same sampler state and step: the same batch
    assert again.samples == batch.samples and again.rows == batch.rows
    assert kind.collect(context(cfg), step=2).samples != batch.samples or case == "dccot"  # fixed fake text
    ev = kind.evaluate(context(cfg), step=0)
    assert 0.0 <= ev["eval/accuracy"] <= 1.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in ev.values())


def test_the_example_kind_by_hand(tmp_path):
    """Two prompts x two attempts, each answered by the fake coin: a wrong first turn gets a second one, and the
    reward is the last turn's verdict less retry_cost for the retry."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "kind.name=plugin", f"kind.path={EXAMPLE}",
                             "kind.options={retry_cost: 0.25}", "rollout.prompts_per_step=2",
                             "rollout.num_samples_per_prompt=2", "algorithm.advantage_estimator=rloo"])
    kind, ctx = make_kind(cfg), context(cfg)
    turns, rewards = kind.attempts(ctx, ctx.eval_items[:2], 2, 1, 1.0, 16)
    assert len(turns) == 4
    for t, r in zip(turns, rewards):
        first_right = t[0][2].correct
        assert len(t) == (1 if first_right else 2)
        assert r == (1.0 if first_right else float(t[1][2].correct) - 0.25)
        if not first_right:
            assert t[1][0].prompt == t[0][0].prompt + t[0][1].response_text + kind.options.feedback
    batch = kind.collect(context(cfg), step=1)
    assert batch.metrics["rollout/num_samples"] == sum(len(t) for t in kind.attempts(
        context(cfg), context(cfg).sampler.next(2), 2, 1, cfg.rollout.temperature, cfg.rollout.max_response_tokens)[0])


def test_a_user_kind_is_checked_when_the_run_starts(tmp_path):
    base = [f"run.output_dir={tmp_path}", "kind.name=plugin"]
    with pytest.raises(ValueError, match="not found"):
        make_kind(load_config(None, [*base, "kind.path=nowhere/kind.py:K"]))
    with pytest.raises(ValueError, match="has no class 'Nope'"):
        make_kind(load_config(None, [*base, "kind.path=docs/examples/retry_kind.py:Nope"]))
    with pytest.raises(ValueError, match="give `path/to/file.py:ClassName`"):
        make_kind(load_config(None, [*base, "kind.path=retry_kind"]))
    with pytest.raises(ValueError, match="retry_costt"):
        make_kind(load_config(None, [*base, f"kind.path={EXAMPLE}", "kind.options={retry_costt: 1}"]))
    lacking = tmp_path / "k.py"
    lacking.write_text("class K:\n    name = 'k'\n    def collect(self, ctx, step): ...\n")
    with pytest.raises(ValueError, match="K lacks evaluate"):
        make_kind(load_config(None, [*base, f"kind.path={lacking}:K"]))


def test_kind_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"kind.name='episode': choose one of single_turn, episodes, dccot, plugin"):
        load_config(None, ["kind.name=episode"])
    with pytest.raises(ConfigError, match="'multiturn' is now the kind section"):
        load_config(None, ["multiturn.env=number_target"])
    with pytest.raises(ConfigError, match="unknown config key 'kind.groups_per_stp'"):
        load_config(None, ["kind.name=episodes", "kind.env=number_target", "kind.groups_per_stp=2"])
    with pytest.raises(ConfigError, match="kind episodes: GDRO and dynamic sampling"):
        load_config(None, ["kind.name=episodes", "kind.env=number_target", "rollout.dynamic_sampling.enabled=true"])
