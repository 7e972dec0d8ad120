import math

import pytest
import torch

from rl.algorithms import KL_ESTIMATORS, kl_estimate, kl_reward_penalty


def test_k3_hand_computed():
    # ratio_ref = 0.25 / 0.5 = 0.5 -> 0.5 - log 0.5 - 1 = 0.1931
    k = kl_estimate(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), "k3")
    assert k.item() == pytest.approx(0.1931, abs=1e-4)


def test_k1_k2_hand_computed():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)


@pytest.mark.parametrize("est", KL_ESTIMATORS)
def test_zero_when_equal_and_grad_only_to_logp(est):
    logp = torch.tensor([-0.3, -2.0], requires_grad=True)
    ref = torch.tensor([-0.3, -2.0], requires_grad=True)
    k = kl_estimate(logp, ref, est)
    assert torch.equal(k.detach(), torch.zeros(2))
    (k.sum() + (logp - 1.0).sum()).backward()
    assert ref.grad is None and logp.grad is not None


def test_k2_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(50, generator=g) * 5, -torch.rand(50, generator=g) * 5
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_k3_clamped():
    k = kl_estimate(torch.tensor([0.0, -100.0]), torch.tensor([-100.0, 0.0]), "k3")
    assert torch.isfinite(k).all() and k.max().item() == 10.0


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


def test_reward_penalty_sums_masked_tokens_per_sequence():
    logp = torch.tensor([0.0, -1.0, -1.0, -2.0])
    ref = torch.tensor([-1.0, -1.0, -2.0, -1.0])  # k1 = [1, 0, 1, -1]
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    pen = kl_reward_penalty(logp, ref, mask, torch.tensor([0, 0, 1, 1]), 2, kl_coef=0.5)
    torch.testing.assert_close(pen, torch.tensor([0.5, 0.5]))
