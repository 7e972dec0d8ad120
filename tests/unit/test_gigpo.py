"""GiGPO advantages: the hand-computed case of docs/algorithms.md "GiGPO", discounting, anchor grouping and edge
cases."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from rl.algorithms.gigpo import GigpoConfig, GigpoStep, compute_gigpo_advantages


def _s(group, traj, t, state, r):
    return GigpoStep(group, traj, t, state, r)


def _section_4_4():
    """tau_A: s0 -a-> s1 -b-> success; tau_B: s0 -c-> s0 -a-> s1 -d-> fail. Order: A1, A2, B1, B2, B3."""
    steps = [
        _s("g", "A", 0, "s0", 0.0),
        _s("g", "A", 1, "s1", 1.0),
        _s("g", "B", 0, "s0", 0.0),
        _s("g", "B", 1, "s0", 0.0),
        _s("g", "B", 2, "s1", 0.0),
    ]
    return steps, {"A": 1.0, "B": 0.0}


def test_section_4_4_mean_norm():
    steps, returns = _section_4_4()
    res = compute_gigpo_advantages(steps, GigpoConfig(gamma=0.9, omega=1.0), returns)
    assert res.step_returns == pytest.approx([0.9, 1.0, 0.0, 0.0, 0.0])
    assert res.episode_advantages == pytest.approx([0.5, 0.5, -0.5, -0.5, -0.5])
    assert res.step_advantages == pytest.approx([0.6, 0.5, -0.3, -0.3, -0.5])
    assert res.advantages == pytest.approx([1.1, 1.0, -0.8, -0.8, -1.0])
    m = res.metrics
    assert m["gigpo/num_anchor_groups"] == 2
    assert m["gigpo/anchor_group_size_mean"] == pytest.approx(2.5)
    assert m["gigpo/anchored_step_frac"] == 1.0
    # mean|A^E| = 0.5, mean|omega A^S| = (0.6 + 0.5 + 0.3 + 0.3 + 0.5) / 5 = 0.44
    assert m["gigpo/step_adv_share"] == pytest.approx(0.44 / 0.94)


def test_section_4_4_mean_std_norm():
    steps, returns = _section_4_4()
    cfg = GigpoConfig(gamma=0.9, step_norm="mean_std_norm", episode_norm="mean_std_norm")
    res = compute_gigpo_advantages(steps, cfg, returns)
    s = 2**-0.5
    assert res.episode_advantages == pytest.approx([s, s, -s, -s, -s], abs=1e-5)
    assert res.step_advantages == pytest.approx([1.1547, s, -0.5774, -0.5774, -s], abs=1e-4)


def test_population_std_mode():
    steps, returns = _section_4_4()
    cfg = GigpoConfig(gamma=0.9, episode_norm="mean_std_norm", std_mode="population", eps=0.0)
    res = compute_gigpo_advantages(steps, cfg, returns)
    assert res.episode_advantages == pytest.approx([1.0, 1.0, -1.0, -1.0, -1.0])


def test_omega_scales_step_term_and_zero_gives_episode_only():
    steps, returns = _section_4_4()
    res = compute_gigpo_advantages(steps, GigpoConfig(gamma=0.9, omega=0.5), returns)
    assert res.advantages == pytest.approx([0.8, 0.75, -0.65, -0.65, -0.75])
    res0 = compute_gigpo_advantages(steps, GigpoConfig(gamma=0.9, omega=0.0), returns)
    assert res0.advantages == pytest.approx(res0.episode_advantages)
    assert res0.metrics["gigpo/step_adv_share"] == 0.0


def test_discounted_returns_backwards():
    steps = [_s("g", "T", t, f"x{t}", r) for t, r in enumerate([0.0, -0.1, 0.0, 1.0])]
    res = compute_gigpo_advantages(steps, GigpoConfig(gamma=0.5))
    # R_3 = 1, R_2 = 0.5 * 1, R_1 = -0.1 + 0.5 * 0.5, R_0 = 0.5 * 0.15
    assert res.step_returns == pytest.approx([0.075, 0.15, 0.5, 1.0])


def test_input_order_does_not_matter():
    steps, returns = _section_4_4()
    ref = compute_gigpo_advantages(steps, GigpoConfig(gamma=0.9), returns)
    perm = list(range(len(steps)))
    random.Random(0).shuffle(perm)
    res = compute_gigpo_advantages([steps[i] for i in perm], GigpoConfig(gamma=0.9), returns)
    assert res.advantages == pytest.approx([ref.advantages[i] for i in perm])


def test_singleton_anchor_groups_have_zero_step_advantage():
    steps = [_s("g", "A", 0, "a0", 0.0), _s("g", "A", 1, "a1", 1.0), _s("g", "B", 0, "b0", 0.0)]
    res = compute_gigpo_advantages(steps, GigpoConfig(), {"A": 1.0, "B": 0.0})
    assert res.step_advantages == [0.0, 0.0, 0.0]
    assert res.advantages == pytest.approx([0.5, 0.5, -0.5])
    assert res.metrics["gigpo/anchored_step_frac"] == 0.0
    assert res.metrics["gigpo/num_anchor_groups"] == 3
    assert res.metrics["gigpo/step_adv_share"] == 0.0


@pytest.mark.parametrize("mode", ["mean_norm", "mean_std_norm"])
def test_all_equal_returns_give_zero_without_nan(mode):
    steps = [_s("g", t, i, "s", 0.0) for t in "ABC" for i in range(2)]
    res = compute_gigpo_advantages(steps, GigpoConfig(step_norm=mode, episode_norm=mode, eps=0.0))
    assert res.advantages == [0.0] * 6
    assert res.metrics["gigpo/step_adv_share"] == 0.0


def test_all_failures_with_penalty_still_have_step_signal():
    """A^E = 0 when every trajectory fails, but an invalid-action penalty differentiates steps."""
    steps = [_s("g", "A", 0, "s0", -0.1), _s("g", "B", 0, "s0", 0.0)]
    res = compute_gigpo_advantages(steps, GigpoConfig(), {"A": 0.0, "B": 0.0})
    assert res.episode_advantages == [0.0, 0.0]
    assert res.step_advantages == pytest.approx([-0.05, 0.05])


def test_one_trajectory():
    """A singleton episode group gets A^E = 0; a state it revisits still forms an anchor group."""
    steps = [_s("g", "A", 0, "s0", 0.0), _s("g", "A", 1, "s0", 0.0), _s("g", "A", 2, "s1", 1.0)]
    res = compute_gigpo_advantages(steps, GigpoConfig(gamma=0.9))
    assert res.episode_advantages == [0.0, 0.0, 0.0]
    # returns 0.81, 0.9, 1.0; s0 group mean 0.855
    assert res.step_advantages == pytest.approx([-0.045, 0.045, 0.0])
    distinct = [_s("g", "A", t, f"s{t}", 1.0) for t in range(3)]
    assert compute_gigpo_advantages(distinct, GigpoConfig()).advantages == [0.0, 0.0, 0.0]


def test_anchor_groups_never_cross_episode_groups():
    steps = [_s("g1", "A", 0, "s", 1.0), _s("g2", "B", 0, "s", 0.0)]
    res = compute_gigpo_advantages(steps, GigpoConfig())
    assert res.step_advantages == [0.0, 0.0]
    assert res.metrics["gigpo/num_anchor_groups"] == 2


def test_default_episode_return_is_sum_of_step_rewards():
    steps, _ = _section_4_4()
    res = compute_gigpo_advantages(steps, GigpoConfig(gamma=0.9))
    assert res.advantages == pytest.approx([1.1, 1.0, -0.8, -0.8, -1.0])


def test_empty_input():
    res = compute_gigpo_advantages([], GigpoConfig())
    assert res.advantages == [] and res.metrics["gigpo/num_anchor_groups"] == 0


def test_inconsistent_input_is_rejected():
    with pytest.raises(ValueError, match="unique across the batch"):
        compute_gigpo_advantages([_s("g1", "A", 0, "s", 0.0), _s("g2", "A", 1, "s", 0.0)], GigpoConfig())
    with pytest.raises(ValueError, match="step indices"):
        compute_gigpo_advantages([_s("g", "A", 0, "s", 0.0), _s("g", "A", 2, "s", 0.0)], GigpoConfig())
    with pytest.raises(ValueError, match="step indices"):
        compute_gigpo_advantages([_s("g", "A", 0, "s", 0.0), _s("g", "A", 0, "t", 0.0)], GigpoConfig())
    with pytest.raises(ValueError, match="no episode return"):
        compute_gigpo_advantages([_s("g", "A", 0, "s", 0.0)], GigpoConfig(), {"B": 1.0})


def test_config_defaults_and_validation():
    cfg = GigpoConfig()
    assert (cfg.gamma, cfg.omega, cfg.eps) == (0.95, 1.0, 1e-6)
    assert (cfg.step_norm, cfg.episode_norm, cfg.std_mode) == ("mean_norm", "mean_norm", "sample")
    with pytest.raises(ValidationError, match="Did you mean 'omega'"):
        GigpoConfig(omgea=1.0)
    with pytest.raises(ValidationError):
        GigpoConfig(step_norm="std")
    with pytest.raises(ValidationError):
        GigpoConfig(gamma=1.5)
    assert all(f.description for f in GigpoConfig.model_fields.values())
