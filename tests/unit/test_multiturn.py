"""Multi-turn episodes with a fake deterministic generate_fn: lock-step batching, token-exact steps, repeated
anchor states, the number_target environment's rules, and GiGPO advantages end to end."""

from __future__ import annotations

import random

import pytest

from rl.algorithms.gigpo import GigpoConfig
from rl.types import Rollout
from rollout.env import ENVIRONMENTS, StepEnv, make_env
from rollout.envs_builtin import NumberTargetEnv, min_steps_to_target
from rollout.multiturn import (
    episode_advantages,
    episode_metrics,
    gigpo_steps,
    run_episodes,
    to_train_samples,
)


class FakeEngine:
    """Picks an action from the seed alone; token ids deliberately differ from any tokenization of the text."""

    def __init__(self, actions=("+1", "*2", "\\boxed{+1}", "hmm")):
        self.actions = actions
        self.calls: list[tuple[list[str], list[int], list[Rollout]]] = []

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Rollout]:
        out = []
        for prompt, seed in zip(prompts, seeds):
            rng = random.Random(seed)
            text = rng.choice(self.actions)
            n = rng.randint(1, 4)
            out.append(
                Rollout(
                    prompt_id="",
                    prompt_token_ids=[len(prompt), seed % 997, 5],
                    response_token_ids=[rng.randrange(50_000) for _ in range(n)],
                    logprobs=[-rng.random() for _ in range(n)],
                    finish_reason="stop",
                    policy_version=3,
                    response_text=text,
                )
            )
        self.calls.append((list(prompts), list(seeds), out))
        return out


def _run(engine, seeds=(0, 1, 2), group_size=8, max_steps=6, **kw):
    return run_episodes(engine, lambda: make_env("number_target"), list(seeds), group_size, max_steps, **kw)


# ---------------------------------------------------------------- environment


def test_registry_and_protocol():
    assert "number_target" in ENVIRONMENTS
    assert isinstance(make_env("number_target"), StepEnv)
    with pytest.raises(ValueError, match="Valid names: .*number_target"):
        make_env("number_targte")


def test_same_seed_same_start_and_reachable_target():
    for seed in range(200):
        env_a, env_b = NumberTargetEnv(), NumberTargetEnv()
        assert env_a.reset(seed) == env_b.reset(seed)
        assert env_a.state_key() == env_b.state_key()
        assert 1 <= env_a.current <= 5 and env_a.current + 2 <= env_a.target <= 20
        assert min_steps_to_target(env_a.current, env_a.target) <= env_a.max_steps
    starts = {NumberTargetEnv().reset(s) for s in range(50)}
    assert len(starts) > 10  # seeds give different tasks


def _env_at(current, target, max_steps=6):
    env = NumberTargetEnv(max_steps=max_steps)
    env.reset(0)
    env.current, env.target = current, target
    return env


def test_prompt_format_is_short_plain_text():
    env = _env_at(3, 10)
    assert env.observation() == "State: 3. Target: 10. Action (+1 or *2):"
    assert env.state_key() == "3/10"


@pytest.mark.parametrize(
    "text, nxt",
    [
        ("+1", 4),
        ("*2", 6),
        (" *2 then +1", 6),
        ("+1.", 4),
        ("\\boxed{*2}", 6),
        ("I pick \\boxed{+ 1}", 4),
        ("6 \\boxed{6}", 6),
        ("4", 4),
        ("5", None),
        ("+10", None),
        ("*3", None),
        ("", None),
        ("double it", None),
        ("\\boxed{}", None),
    ],
)
def test_action_parsing(text, nxt):
    assert _env_at(3, 10).parse_action(text) == nxt


def test_rules_success_overshoot_invalid_and_step_limit():
    env = _env_at(3, 7)
    r = env.step("*2")
    assert (r.reward, r.done, env.state_key()) == (0.0, False, "6/7")
    r = env.step("nonsense")
    assert (r.reward, r.done, r.info["invalid_action"], env.state_key()) == (-0.1, False, True, "6/7")
    r = env.step("+1")
    assert (r.reward, r.done, r.info["success"]) == (1.0, True, True)
    with pytest.raises(RuntimeError):
        env.step("+1")

    env = _env_at(5, 9)
    r = env.step("*2")
    assert (r.reward, r.done, r.info["overshoot"]) == (0.0, True, True)

    env = _env_at(1, 20, max_steps=2)
    assert not env.step("+1").done
    assert env.step("+1").done  # step limit


# ---------------------------------------------------------------- episodes


def test_lock_step_one_generate_call_per_turn():
    engine = FakeEngine()
    episodes = _run(engine)
    assert len(episodes) == 24
    longest = max(len(ep.steps) for ep in episodes)
    assert len(engine.calls) == longest
    for t, (prompts, _, _) in enumerate(engine.calls):
        alive = [ep for ep in episodes if len(ep.steps) > t]
        assert len(prompts) == len(alive)
    sizes = [len(c[0]) for c in engine.calls]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 24
    for ep in episodes:
        assert [s.step_index for s in ep.steps] == list(range(len(ep.steps)))
        assert all(not s.done for s in ep.steps[:-1])
        assert ep.done or len(ep.steps) == 6


def test_steps_keep_engine_tokens_exactly():
    engine = FakeEngine()
    episodes = _run(engine)
    returned = [ro for _, _, rollouts in engine.calls for ro in rollouts]
    by_turn = {}
    for ep in episodes:
        for s in ep.steps:
            by_turn.setdefault(s.step_index, []).append(s)
    stored = [s for t in sorted(by_turn) for s in by_turn[t]]
    assert len(stored) == len(returned)
    for s, ro in zip(stored, returned):
        assert s.prompt_token_ids == ro.prompt_token_ids
        assert s.response_token_ids == ro.response_token_ids
        assert s.logprobs == ro.logprobs
        assert s.action_text == ro.response_text
        assert s.policy_version == 3


def test_groups_share_initial_state_and_trajectories_differ():
    episodes = _run(FakeEngine())
    for g in range(3):
        group = episodes[8 * g : 8 * (g + 1)]
        assert len({ep.episode_group_id for ep in group}) == 1
        assert len({ep.steps[0].state_key for ep in group}) == 1
        assert len({ep.steps[0].prompt for ep in group}) == 1
        assert len({tuple(s.action_text for s in ep.steps) for ep in group}) > 1
    assert len({ep.trajectory_id for ep in episodes}) == 24


def test_reproducible_and_seeded():
    a, b = _run(FakeEngine()), _run(FakeEngine())
    tokens = [[[s.response_token_ids for s in ep.steps] for ep in run] for run in (a, b)]
    assert tokens[0] == tokens[1]
    engine = FakeEngine()
    _run(engine, base_seed=1)
    seeds_0 = FakeEngine()
    _run(seeds_0, base_seed=0)
    assert engine.calls[0][1] != seeds_0.calls[0][1]
    assert len(set(seeds_0.calls[0][1])) == 24  # every trajectory samples with its own seed


def test_run_cap_cuts_episodes_off():
    episodes = _run(FakeEngine(actions=("+1",)), seeds=(0,), group_size=2, max_steps=1)
    assert all(len(ep.steps) == 1 for ep in episodes)
    m = episode_metrics(episodes)
    assert m["rollout/episode_cut_off_frac"] == 1.0 and m["rollout/episode_steps_mean"] == 1.0


def test_generate_fn_must_return_one_rollout_per_prompt():
    with pytest.raises(RuntimeError, match="rollouts for"):
        _run(lambda prompts, seeds: [], seeds=(0,), group_size=2)


def test_anchor_states_repeat_across_trajectories():
    episodes = _run(FakeEngine())
    res = episode_advantages(episodes, GigpoConfig())
    assert res.metrics["gigpo/anchored_step_frac"] > 0.5
    assert res.metrics["gigpo/anchor_group_size_mean"] > 1.5
    # some anchor group spans at least two different trajectories
    trajs_by_anchor = {}
    for st in gigpo_steps(episodes):
        trajs_by_anchor.setdefault((st.episode_group_id, st.state_key), set()).add(st.trajectory_id)
    assert max(len(t) for t in trajs_by_anchor.values()) >= 2


def test_gigpo_end_to_end_train_samples():
    episodes = _run(FakeEngine())
    cfg = GigpoConfig(gamma=0.9)
    res = episode_advantages(episodes, cfg)
    samples = to_train_samples(episodes, res.advantages)
    steps = [(ep, s) for ep in episodes for s in ep.steps]
    assert len(samples) == len(steps) == len(res.advantages)
    for sample, (ep, s), adv in zip(samples, steps, res.advantages):
        assert sample.group_id == ep.episode_group_id
        assert sample.prompt_token_ids == s.prompt_token_ids
        assert sample.response_token_ids == s.response_token_ids
        assert sample.behaviour_logprobs == s.logprobs
        assert sample.advantage == adv
    assert any(a != 0.0 for a in res.step_advantages)
    # each episode group's episode advantages are centred (mean_norm), one value per trajectory
    for g in {ep.episode_group_id for ep in episodes}:
        pairs = zip(gigpo_steps(episodes), res.episode_advantages)
        per_traj = {st.trajectory_id: a for st, a in pairs if st.episode_group_id == g}
        assert sum(per_traj.values()) == pytest.approx(0.0, abs=1e-9)
    m = episode_metrics(episodes)
    assert 0.0 < m["rollout/invalid_action_frac"] < 1.0
    with pytest.raises(ValueError, match="advantages for"):
        to_train_samples(episodes, res.advantages[:-1])
