import pytest
from pydantic import ValidationError

from rl.algorithms import AlgorithmConfig


def test_defaults():
    cfg = AlgorithmConfig()
    assert cfg.advantage_estimator == "grpo" and cfg.policy_loss == "ppo_clip"
    assert cfg.norm_adv_by_std and cfg.std_mode == "sample" and cfg.adv_eps == 1e-6
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c) == (0.2, 0.2, None)
    assert cfg.loss_agg_mode == "token-mean" and cfg.loss_agg_const_len is None
    assert (cfg.kl_coef, cfg.kl_estimator, cfg.kl_in, cfg.log_ratio_clamp) == (0.0, "k3", "loss", 20.0)
    assert (cfg.sapo_tau_pos, cfg.sapo_tau_neg) == (1.0, 1.05)
    assert cfg.advantage_shaping == "none" and (cfg.ds_gamma_pos, cfg.ds_gamma_neg) == (0.01, 0.01)
    assert cfg.ds_logprob_norm == "mean"
    assert not cfg.needs_ref_logprobs and not cfg.needs_sequence_logprobs
    assert AlgorithmConfig(kl_coef=0.001).needs_ref_logprobs
    assert AlgorithmConfig(advantage_shaping="differential_smoothing").needs_sequence_logprobs


def test_every_field_documented():
    for name, field in AlgorithmConfig.model_fields.items():
        assert field.description, name


def test_unknown_key_suggests_nearest():
    with pytest.raises(ValidationError, match=r"unknown algorithm option 'clip_eps_hi'.*Did you mean 'clip_eps_high'"):
        AlgorithmConfig(clip_eps_hi=0.28)


def test_unknown_registry_names_list_valid():
    with pytest.raises(ValidationError, match=r"Did you mean 'grpo'.*grpo, rloo"):
        AlgorithmConfig(advantage_estimator="gpro")
    with pytest.raises(ValidationError, match=r"Did you mean 'sapo'.*gspo, ppo_clip, sapo"):
        AlgorithmConfig(policy_loss="sapo_typo")
    with pytest.raises(ValidationError, match=r"unknown advantage shaping 'ds'.*differential_smoothing, none"):
        AlgorithmConfig(advantage_shaping="ds")
    with pytest.raises(ValidationError, match=r"Did you mean 'differential_smoothing'"):
        AlgorithmConfig(advantage_shaping="differential_smothing")


def test_sapo_tau_neg_not_below_tau_pos():
    assert AlgorithmConfig(policy_loss="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.0).sapo_tau_neg == 1.0
    with pytest.raises(ValidationError, match=r"sapo_tau_neg \(0.9\) must be >= sapo_tau_pos \(1.0\)"):
        AlgorithmConfig(sapo_tau_neg=0.9)
    with pytest.raises(ValidationError):
        AlgorithmConfig(sapo_tau_pos=0.0)


def test_dual_clip_must_exceed_one():
    assert AlgorithmConfig(dual_clip_c=3.0).dual_clip_c == 3.0
    with pytest.raises(ValidationError, match="dual_clip_c must be > 1"):
        AlgorithmConfig(dual_clip_c=1.0)


def test_norm_mode_needs_const_len():
    with pytest.raises(ValidationError, match="set loss_agg_const_len"):
        AlgorithmConfig(loss_agg_mode="seq-mean-token-sum-norm")
    drgrpo = AlgorithmConfig(norm_adv_by_std=False, loss_agg_mode="seq-mean-token-sum-norm", loss_agg_const_len=4096)
    assert drgrpo.loss_agg_const_len == 4096


def test_ranges_and_literals():
    for bad in ({"clip_eps_low": 1.0}, {"clip_eps_high": -0.1}, {"kl_coef": -1.0}, {"std_mode": "bessel"},
                {"kl_estimator": "k4"}, {"loss_agg_mode": "mean"}, {"log_ratio_clamp": 0.0},
                {"ds_gamma_pos": -0.01}, {"ds_gamma_neg": -0.01}, {"ds_logprob_norm": "max"}):
        with pytest.raises(ValidationError):
            AlgorithmConfig(**bad)


def test_assignment_is_validated():
    cfg = AlgorithmConfig()
    with pytest.raises(ValidationError):
        cfg.policy_loss = "nope"
