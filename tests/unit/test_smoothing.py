import pytest
import torch

from rl.algorithms import AdvantageInput, AlgorithmConfig, compute_advantages, differential_smoothing, shape_advantages

F64 = torch.float64


def _cfg(**kw):
    return AlgorithmConfig(advantage_shaping="differential_smoothing", **kw)


def test_reference_case_sum_mode():
    """docs/algorithms.md "Differential smoothing": population-std GRPO on [1,0,0,1] gives [+1,-1,-1,+1];
    log pi [-20,-50,-10,-5], gammas 0.01."""
    cfg = _cfg(std_mode="population", adv_eps=0.0, ds_logprob_norm="sum")
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64)
    adv = compute_advantages(AdvantageInput(rewards, ["p"] * 4), cfg)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64))
    logp = torch.tensor([-20.0, -50.0, -10.0, -5.0], dtype=F64)
    lengths = torch.tensor([7, 9, 3, 2])  # ignored in sum mode
    shaped, m = differential_smoothing(adv, rewards > 0, logp, lengths, cfg)
    torch.testing.assert_close(shaped, torch.tensor([1.20, -1.50, -1.10, 1.05], dtype=F64))
    assert m["ds/term_abs_mean"] == pytest.approx((0.20 + 0.50 + 0.10 + 0.05) / 4)
    assert m["ds/adv_abs_mean"] == pytest.approx(1.0)
    assert m["ds/term_to_adv_ratio"] == pytest.approx((0.20 + 0.50 + 0.10 + 0.05) / 4)


def test_mean_mode_divides_by_length():
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)
    correct = torch.tensor([True, False, False, True])
    logp = torch.tensor([-20.0, -50.0, -10.0, -5.0], dtype=F64)
    lengths = torch.tensor([10, 25, 0, 5])  # per-token log pi: -2, -2, -10 (length 0 counts as 1), -1
    shaped, _ = differential_smoothing(adv, correct, logp, lengths, _cfg(ds_gamma_pos=0.1, ds_gamma_neg=0.2))
    torch.testing.assert_close(shaped, torch.tensor([1.2, -1.4, -3.0, 1.1], dtype=F64))


def test_empty_input():
    e = torch.zeros(0, dtype=F64)
    shaped, m = differential_smoothing(e, torch.zeros(0, dtype=torch.bool), e, torch.zeros(0), _cfg())
    assert shaped.shape == (0,)
    assert m == {"ds/term_abs_mean": 0.0, "ds/adv_abs_mean": 0.0, "ds/term_to_adv_ratio": 0.0}


def test_zero_gammas_are_the_identity():
    adv = torch.tensor([0.5, -0.5, 0.0], dtype=F64)
    logp = torch.tensor([-3.0, -40.0, -1.0], dtype=F64)
    cfg = _cfg(ds_gamma_pos=0.0, ds_gamma_neg=0.0)
    shaped, m = differential_smoothing(adv, torch.tensor([True, False, True]), logp, torch.tensor([1, 2, 3]), cfg)
    torch.testing.assert_close(shaped, adv)
    assert m["ds/term_abs_mean"] == 0.0 and m["ds/term_to_adv_ratio"] == 0.0


def test_all_correct_group_still_gets_the_smoothing_term():
    # A = 0 for an all-correct group, yet rarer answers get more credit; the ratio metric skips A = 0 samples
    adv = torch.zeros(3, dtype=F64)
    logp = torch.tensor([-2.0, -8.0, -4.0], dtype=F64)
    shaped, m = differential_smoothing(adv, torch.ones(3, dtype=torch.bool), logp, torch.ones(3), _cfg())
    torch.testing.assert_close(shaped, torch.tensor([0.02, 0.08, 0.04], dtype=F64))
    assert m["ds/adv_abs_mean"] == 0.0 and m["ds/term_to_adv_ratio"] == 0.0
    assert m["ds/term_abs_mean"] == pytest.approx(0.14 / 3)


def test_output_is_detached_and_keeps_dtype():
    adv = torch.tensor([1.0, -1.0], requires_grad=True)
    logp = torch.tensor([-3.0, -4.0], dtype=F64, requires_grad=True)
    shaped, _ = differential_smoothing(adv, torch.tensor([True, False]), logp, torch.tensor([3, 4]), _cfg())
    assert not shaped.requires_grad and shaped.dtype == torch.float32


def test_input_validation():
    adv = torch.zeros(3)
    with pytest.raises(ValueError, match="correct must be a bool"):
        differential_smoothing(adv, torch.ones(3), adv, torch.ones(3), _cfg())
    with pytest.raises(ValueError, match="lengths has shape"):
        differential_smoothing(adv, torch.ones(3, dtype=torch.bool), adv, torch.ones(2), _cfg())


def test_shape_advantages_dispatches_on_config():
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    args = (torch.tensor([True, False]), torch.tensor([-10.0, -10.0], dtype=F64), torch.tensor([1, 1]))
    same, m = shape_advantages(adv, *args, AlgorithmConfig())
    assert same is adv and m == {}
    shaped, m = shape_advantages(adv, *args, _cfg(ds_logprob_norm="sum"))
    torch.testing.assert_close(shaped, torch.tensor([1.1, -1.1], dtype=F64))
    assert set(m) == {"ds/term_abs_mean", "ds/adv_abs_mean", "ds/term_to_adv_ratio"}
