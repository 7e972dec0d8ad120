import pytest
import torch

from rl.algorithms import AdvantageInput, AlgorithmConfig, compute_advantages
from rl.algorithms.advantages import group_index


def _adv(rewards, groups=None, **cfg):
    groups = groups or ["g"] * len(rewards)
    inp = AdvantageInput(torch.tensor(rewards, dtype=torch.float32), groups)
    return compute_advantages(inp, AlgorithmConfig(**cfg))


def test_grpo_sample_std_1001():
    a = _adv([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(a, torch.tensor([0.866024, -0.866024, -0.866024, 0.866024]), atol=1e-6, rtol=0)


def test_grpo_population_std_1001():
    torch.testing.assert_close(_adv([1.0, 0.0, 0.0, 1.0], std_mode="population"),
                               torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_grpo_1110_sample_and_population():
    torch.testing.assert_close(_adv([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.5, 0.5, 0.5, -1.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(_adv([1.0, 1.0, 1.0, 0.0], std_mode="population"),
                               torch.tensor([0.5774, 0.5774, 0.5774, -1.7321]), atol=1e-4, rtol=0)


def test_drgrpo_is_grpo_without_std():
    torch.testing.assert_close(_adv([1.0, 1.0, 1.0, 0.0], norm_adv_by_std=False),
                               torch.tensor([0.25, 0.25, 0.25, -0.75]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("est", ["grpo", "rloo"])
@pytest.mark.parametrize("value", [1.0, 0.1, -3.7])
def test_all_equal_group_is_exactly_zero(est, value):
    a = _adv([value] * 3, advantage_estimator=est)
    assert torch.equal(a, torch.zeros(3))


@pytest.mark.parametrize("est", ["grpo", "rloo"])
def test_singleton_group_gets_zero_not_raw_reward(est):
    a = _adv([1.0, 1.0, 0.0], ["solo", "pair", "pair"], advantage_estimator=est)
    assert a[0].item() == 0.0
    assert a[1].item() > 0 > a[2].item()


def test_groups_are_independent_and_need_not_be_contiguous():
    a = _adv([1.0, 5.0, 0.0, 5.0, 0.0, 1.0, 1.0, 9.0], ["a", "b", "a", "b", "a", "a", "c", "c"], norm_adv_by_std=False)
    # a: [1,0,0,1] mean 0.5; b: all equal; c: [1,9] mean 5
    torch.testing.assert_close(a, torch.tensor([0.5, 0.0, -0.5, 0.0, -0.5, 0.5, -4.0, 4.0]))


def test_rloo_leave_one_out():
    # [1,1,1,0]: A_i = R_i - mean of the others -> 1 - 2/3, ..., 0 - 1
    torch.testing.assert_close(_adv([1.0, 1.0, 1.0, 0.0], advantage_estimator="rloo"),
                               torch.tensor([1 / 3, 1 / 3, 1 / 3, -1.0]))


def test_dtype_preserved_and_no_grad():
    r = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    a = compute_advantages(AdvantageInput(r, ["g", "g"]), AlgorithmConfig())
    assert a.dtype == torch.float64 and not a.requires_grad


def test_input_validation():
    with pytest.raises(ValueError, match="group_ids"):
        AdvantageInput(torch.zeros(3), ["a", "b"])
    with pytest.raises(ValueError, match="1-D float"):
        AdvantageInput(torch.zeros(2, 2), ["a", "b"])


def test_group_index_first_appearance_order():
    idx, n = group_index(["x", "y", "x", "z"])
    assert idx.tolist() == [0, 1, 0, 2] and n == 3
