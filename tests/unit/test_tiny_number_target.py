"""The embedded ``number_target`` warm start (trainers/tiny_number_target.py): its states, demonstrations,
tokenizer, a small build, and the recipe that uses it."""

from pathlib import Path

import pytest

from rl.config import load_config
from rl.plan.base import TINY_SHAPES
from rl.types import Rollout
from rollout.envs_builtin import NumberTargetEnv
from rollout.multiturn import run_episodes
from trainers.tiny_number_target import (
    action_texts,
    build_number_target_tokenizer,
    demonstrations,
    observation,
    reachable_states,
    tokenizer_corpus,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def states():
    return reachable_states()


@pytest.fixture(scope="module")
def tokenizer(states):
    return build_number_target_tokenizer(tokenizer_corpus(states))


def test_reachable_states_hand_checked():
    # start 1 (max_start 1), target 3 (max_target 3), 2 moves: 1 -> 2 (both moves) -> 3
    assert reachable_states(NumberTargetEnv(max_steps=2, max_start=1, max_target=3)) == [(1, 3), (2, 3)]
    # target 4 as well: 1 -> 2 -> {3, 4}, but the second move is the last one: 3/4 is never shown
    assert reachable_states(NumberTargetEnv(max_steps=2, max_start=1, max_target=4)) == [(1, 3), (1, 4), (2, 3),
                                                                                         (2, 4)]
    assert (3, 4) in reachable_states(NumberTargetEnv(max_steps=3, max_start=1, max_target=4))


def test_reachable_states_are_exactly_what_play_can_show(states):
    """Every observation of every action sequence from 3000 reset seeds, against the enumeration."""
    env = NumberTargetEnv()
    seen = set()
    for seed in range(3000):
        env.reset(seed)
        frontier = {env.current}
        for _ in range(env.max_steps):
            seen |= {(c, env.target) for c in frontier}
            frontier = {m for c in frontier for m in (c + 1, 2 * c) if m < env.target}
    assert seen == set(states)
    assert len(states) == 189 and states[0] == (1, 3) and states[-1] == (19, 20)


def test_demonstrations_are_valid_uniform_moves(states):
    env = NumberTargetEnv()
    demos = demonstrations(states)
    assert len(demos) == 4 * len(states)
    assert action_texts(3) == ["+1", "*2", "4", "6"]
    assert demos[:4] == [("State: 1. Target: 3. Action (+1 or *2):", a) for a in ("+1", "*2", "2", "2")]
    by_state: dict[str, list[int]] = {}
    for prompt, response in demos:
        c, t = (int(w.rstrip(".")) for w in prompt.split()[1:4:2])
        env.current, env.target = c, t
        assert prompt == env.observation()
        nxt = env.parse_action(response)
        assert nxt in (c + 1, 2 * c), (prompt, response)
        by_state.setdefault(prompt, []).append(nxt)
    for prompt, moves in by_state.items():
        c = int(prompt.split()[1].rstrip("."))
        assert sorted(moves) == sorted([c + 1, c + 1, 2 * c, 2 * c])  # each move twice: uniform over moves


def test_prompts_are_what_the_episodes_kind_sends(states):
    """``rollout.multiturn.run_episodes`` (the ``episodes`` kind) passes the raw observation as the prompt."""
    sent: list[str] = []

    def generate_fn(prompts, seeds):
        sent.extend(prompts)
        return [Rollout(f"r{i}", [], [], [], "stop", 0, "+1") for i in range(len(prompts))]

    run_episodes(generate_fn, NumberTargetEnv, list(range(40)), 2, 6)
    demo_prompts = {p for p, _ in demonstrations(states)}
    assert sent and set(sent) <= demo_prompts


def test_tokenizer_round_trips_observations_and_actions(states, tokenizer):
    texts = [observation(c, t) for c, t in states] + [a for c in range(1, 20) for a in action_texts(c)]
    for text in texts + ["\\boxed{*2}", "State: 39. Target: 40. Action (+1 or *2): +1"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer(text)["input_ids"] == ids  # nothing added to prompts (the engine's default encode)
    assert len(tokenizer("+1", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer("*2", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer("14", add_special_tokens=False)["input_ids"]) == 2  # digits one per token
    obs = tokenizer("State: 3. Target: 14. Action (+1 or *2):", add_special_tokens=False)["input_ids"]
    assert len(obs) == 19
    assert len(tokenizer) <= TINY_SHAPES["number_target"].vocab


def test_the_recipe_selects_the_task_and_resolve_model_dispatches(tmp_path, monkeypatch):
    import trainers.tiny_number_target as tnt
    from trainers.job import resolve_model

    cfg = load_config(ROOT / "configs" / "gigpo_tiny_cpu.yaml", [f"run.output_dir={tmp_path}"])
    assert cfg.model.tiny.task == "number_target" and cfg.kind.env == "number_target"
    calls = []

    def record(out, **kwargs):
        calls.append(kwargs)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(tnt, "build_tiny_number_target_model", record)
    assert resolve_model(cfg, tmp_path) == str(tmp_path / "tiny_model")
    assert calls == [{"seed": 0, "eval_problems": 0}]


@pytest.mark.slow
def test_a_small_build_is_loadable(tmp_path):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.tiny_number_target import build_tiny_number_target_model

    metrics = build_tiny_number_target_model(tmp_path, sft_steps=5, sft_target_valid=None, eval_problems=2,
                                             eval_samples=1)
    assert metrics["sft/steps"] == 5 and metrics["sft/rows"] == 4 * 189 and metrics["sft/states"] == 189
    assert metrics["model/vocab_size"] <= TINY_SHAPES["number_target"].vocab
    for key in ("eval/greedy_invalid_frac", "eval/sampled_invalid_frac", "eval/greedy_success",
                "eval/sampled_success", "eval/sampled_plus1_frac", "eval/sampled_number_form_frac"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert json.loads((tmp_path / "tiny_model_build.json").read_text())["sft/steps"] == 5
    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tok) == metrics["model/vocab_size"]
    assert tok.eos_token_id == model.config.eos_token_id
    text = "State: 3. Target: 14. Action (+1 or *2):"
    ids = tok(text)["input_ids"]  # as the engine encodes it: reloaded tokenizer, default special-token handling
    assert tok.decode(ids) == text and len(ids) == 19 and len(tok("+1", add_special_tokens=False)["input_ids"]) == 1
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, 19, len(tok)) and torch.isfinite(logits).all()
