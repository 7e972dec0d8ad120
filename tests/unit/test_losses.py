import math

import pytest
import torch

from rl.algorithms import POLICY_LOSS_METRICS, AlgorithmConfig, PolicyLossInput, aggregate_loss, compute_policy_loss


def _inp(ratios, advs, mask=None, seq_index=None, num_seqs=1):
    """Tokens with old_logp = 0 and logp = log(ratio), so the token ratio is exactly ``ratios``."""
    logp = torch.tensor([math.log(r) for r in ratios], dtype=torch.float64, requires_grad=True)
    t = len(ratios)
    return PolicyLossInput(
        logp=logp,
        old_logp=torch.zeros(t, dtype=torch.float64),
        advantages=torch.tensor(advs, dtype=torch.float64),
        mask=torch.ones(t, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool),
        seq_index=torch.zeros(t, dtype=torch.long) if seq_index is None else torch.tensor(seq_index),
        num_seqs=num_seqs,
    )


def _loss_and_grad(inp, **cfg):
    out = compute_policy_loss(inp, AlgorithmConfig(**cfg))
    out.per_token_loss.sum().backward()
    return out.per_token_loss.detach(), inp.logp.grad, out.metrics


def test_clip_positive_advantage_high_ratio_is_clipped_no_grad():
    loss, grad, m = _loss_and_grad(_inp([1.5], [1.0]))
    assert loss.item() == pytest.approx(-1.2)
    assert grad.item() == 0.0
    assert m["clip_frac"].item() == 1.0


def test_clip_positive_advantage_low_ratio_unclipped_grad_flows():
    loss, grad, m = _loss_and_grad(_inp([0.7], [1.0]))
    assert loss.item() == pytest.approx(-0.7)
    assert grad.item() == pytest.approx(-0.7)  # d(-A r)/dlogp = -A r
    assert m["clip_frac"].item() == 0.0


def test_dual_clip_caps_negative_advantage_no_grad():
    loss, grad, m = _loss_and_grad(_inp([5.0], [-1.0]), dual_clip_c=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert grad.item() == 0.0
    assert m["dual_clip_frac"].item() == 1.0 and m["clip_frac"].item() == 0.0


def test_without_dual_clip_negative_advantage_is_unbounded():
    loss, grad, _ = _loss_and_grad(_inp([5.0], [-1.0]))
    assert loss.item() == pytest.approx(5.0)
    assert grad.item() == pytest.approx(5.0)


def test_clip_higher_dapo_cases():
    loss, grad, _ = _loss_and_grad(_inp([1.3, 1.25, 0.75], [1.0, 1.0, -1.0]), clip_eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.28, -1.25, 0.8], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([0.0, -1.25, 0.0], dtype=torch.float64))


def test_masked_tokens_have_zero_loss_grad_and_do_not_count_in_metrics():
    loss, grad, m = _loss_and_grad(_inp([1.5, 0.7], [1.0, 1.0], mask=[False, True]))
    assert loss[0].item() == 0.0 and grad[0].item() == 0.0
    assert m["clip_frac"].item() == 0.0
    assert m["ratio_mean"].item() == pytest.approx(0.7)


def test_log_ratio_clamped_before_exp():
    inp = _inp([1.0, 1.0], [1.0, -1.0])
    with torch.no_grad():
        inp.logp.copy_(torch.tensor([500.0, -500.0]))
    out = compute_policy_loss(inp, AlgorithmConfig(clip_eps_high=1e30))
    assert torch.isfinite(out.per_token_loss).all()
    assert out.per_token_loss[0].item() == pytest.approx(-math.exp(20.0))


def test_gspo_positive_advantage_clipped_zero_grad():
    # token log-ratios 0.001 -> s = e^0.001 = 1.0010005 > 1 + 4e-4: the clipped branch wins for A > 0
    inp = _inp([math.exp(0.001)] * 3, [1.0] * 3)
    loss, grad, m = _loss_and_grad(inp, policy_loss="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4)
    torch.testing.assert_close(loss, torch.full((3,), -1.0004, dtype=torch.float64))
    assert torch.equal(grad, torch.zeros(3, dtype=torch.float64))
    assert m["clip_frac"].item() == 1.0
    assert m["ratio_mean"].item() == pytest.approx(1.0010005, abs=1e-7)


def test_gspo_negative_advantage_unclipped_grad_flows():
    inp = _inp([math.exp(0.001)] * 3, [-1.0] * 3)
    loss, grad, m = _loss_and_grad(inp, policy_loss="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4)
    torch.testing.assert_close(loss, torch.full((3,), 1.0010005, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.full((3,), 1.0010005, dtype=torch.float64))  # sg trick: d s_t/d logp_t = s
    assert m["clip_frac"].item() == 0.0


def test_gspo_token_matches_sequence_level_gspo_value_and_gradient():
    torch.manual_seed(0)
    lens = [3, 1, 4]
    seq_index = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    t = seq_index.numel()
    logp = (-torch.rand(t, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(t, dtype=torch.float64)
    seq_adv = torch.tensor([0.7, -1.2, 0.3], dtype=torch.float64)
    mask = torch.ones(t, dtype=torch.bool)
    mask[5] = False  # a masked token inside the last sequence is excluded from its mean
    cfg = AlgorithmConfig(
        policy_loss="gspo", clip_eps_low=0.01, clip_eps_high=0.02, loss_agg_mode="seq-mean-token-mean"
    )
    out = compute_policy_loss(PolicyLossInput(logp, old, seq_adv[seq_index], mask, seq_index, 3), cfg)
    ours = aggregate_loss(
        out.per_token_loss, mask, seq_index, cfg.loss_agg_mode, global_num_tokens=7, global_num_seqs=3
    )
    (g_ours,) = torch.autograd.grad(ours, logp)

    # Sequence-level GSPO written directly: s_i = exp(mean_t log-ratio), loss = mean_i max(-A s, -A clip(s)).
    ref_terms = []
    for i in range(3):
        sel = (seq_index == i) & mask
        s = torch.exp((logp[sel] - old[sel]).mean())
        a = seq_adv[i]
        ref_terms.append(torch.maximum(-a * s, -a * s.clamp(1 - 0.01, 1 + 0.02)))
    ref = torch.stack(ref_terms).mean()
    (g_ref,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_clip_fracs_split_by_side_and_clipped_tokens_get_exactly_zero_grad():
    # tokens: A>0 r above 1+eps (high clip), A<0 r below 1-eps (low clip), A>0 r low and A<0 r high
    # (unclipped: the clip only binds on the side the advantage pushes towards), on-policy, A=0
    loss, grad, m = _loss_and_grad(_inp([1.5, 0.5, 0.5, 1.5, 1.0, 1.5], [1.0, -1.0, 1.0, -1.0, 1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([-1.2, 0.8, -0.5, 1.5, -1.0, 0.0], dtype=torch.float64))
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0 and grad[5].item() == 0.0
    torch.testing.assert_close(grad[2:5], torch.tensor([-0.5, 1.5, -1.0], dtype=torch.float64))  # -A r
    assert m["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert m["clip_frac"].item() == pytest.approx(2 / 6)
    assert m["dual_clip_frac"].item() == 0.0
    assert m["gate_mean"].item() == pytest.approx(4 / 6)  # 1 on unclipped tokens, 0 on clipped ones


def test_gspo_clip_fracs_split_by_side():
    # two sequences with the same ratio s = e^0.001 > 1 + 4e-4: only the A>0 one is clipped (high side)
    inp = _inp([math.exp(0.001)] * 4, [1.0, 1.0, -1.0, -1.0], seq_index=[0, 0, 1, 1], num_seqs=2)
    _, grad, m = _loss_and_grad(inp, policy_loss="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4)
    assert torch.equal(grad[:2], torch.zeros(2, dtype=torch.float64)) and (grad[2:] != 0).all()
    assert (m["clip_frac_high"].item(), m["clip_frac_low"].item(), m["clip_frac"].item()) == (0.5, 0.0, 0.5)
    assert m["gate_mean"].item() == 0.5


# SAPO (docs/algorithms.md "SAPO"): (tau, r, gate f(r), weight w(r) = f'(r)); d loss / d logp = -A w r.
SAPO_TABLE = [
    (1.0, 1.0, 2.000000, 1.000000),
    (1.0, 1.5, 2.489837, 0.940015),
    (1.0, 2.0, 2.924234, 0.786448),
    (1.0, 0.5, 1.510163, 0.940015),
    (1.05, 1.0, 1.904762, 1.000000),
    (1.05, 1.5, 2.393585, 0.934140),
    (1.05, 2.0, 2.822000, 0.768110),
    # tau = 1000 (the integration run's): a ratio 0.2% off 1 already gets w = sech^2(1) = 0.419974 either side
    (1000.0, 1.002, 0.003523, 0.419974),
    (1000.0, 0.998, 0.000477, 0.419974),
]


@pytest.mark.parametrize(("tau", "r", "gate", "w"), SAPO_TABLE)
def test_sapo_gate_table(tau, r, gate, w):
    loss, grad, m = _loss_and_grad(_inp([r], [1.0]), policy_loss="sapo", sapo_tau_pos=tau, sapo_tau_neg=tau)
    assert loss.item() == pytest.approx(-gate, abs=1e-6)
    assert grad.item() == pytest.approx(-w * r, abs=1e-6)
    assert m["gate_mean"].item() == pytest.approx(w, abs=1e-6)


def test_sapo_autograd_picks_tau_by_advantage_sign():
    loss, grad, m = _loss_and_grad(_inp([1.5], [1.0]), policy_loss="sapo")  # tau_pos = 1.0
    assert loss.item() == pytest.approx(-2.489837, abs=1e-6)
    assert grad.item() == pytest.approx(-1.410022, abs=1e-6)
    loss, grad, m = _loss_and_grad(_inp([1.5], [-1.0]), policy_loss="sapo")  # tau_neg = 1.05
    assert loss.item() == pytest.approx(2.393585, abs=1e-6)
    assert grad.item() == pytest.approx(1.401210, abs=1e-6)
    assert m["clip_frac"].item() == 0.0 and m["dual_clip_frac"].item() == 0.0


def test_sapo_zero_advantage_and_masked_tokens_contribute_nothing():
    inp = _inp([1.5, 0.7, 2.0], [0.0, 1.0, -1.0], mask=[True, True, False])
    loss, grad, m = _loss_and_grad(inp, policy_loss="sapo")
    assert loss[0].item() == 0.0 and grad[0].item() == 0.0  # A = 0
    assert loss[2].item() == 0.0 and grad[2].item() == 0.0  # masked
    assert grad[1].item() != 0.0
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.7) / 2)  # masked token not counted


def test_sapo_never_zeroes_a_far_off_policy_gradient():
    _, grad, _ = _loss_and_grad(_inp([3.0, 0.2], [1.0, -1.0]), policy_loss="sapo")
    assert (grad.abs() > 0).all()


@pytest.mark.parametrize("policy_loss", ["ppo_clip", "gspo", "sapo"])
def test_metrics_are_detached_scalars(policy_loss):
    _, _, m = _loss_and_grad(_inp([1.5, 0.7, 1.0], [1.0, -1.0, 0.5]), policy_loss=policy_loss)
    assert tuple(m) == POLICY_LOSS_METRICS
    assert m["clip_frac"].item() == pytest.approx(m["clip_frac_low"].item() + m["clip_frac_high"].item())
    for v in m.values():
        assert v.dim() == 0 and not v.requires_grad


def test_input_shape_validation():
    with pytest.raises(ValueError, match="mask has shape"):
        PolicyLossInput(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(2), torch.zeros(3).long(), 1)
    with pytest.raises(ValueError, match="torch.long"):
        PolicyLossInput(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3), torch.zeros(3), 1)


def test_cispo_hand_computed():
    # r = (0.5, 2, 8), A = (1, -1, 2), weight cap 5: w = (0.5, 2, 5); loss = -A w log r; grad = -A w
    loss, grad, m = _loss_and_grad(_inp([0.5, 2.0, 8.0], [1.0, -1.0, 2.0]), policy_loss="cispo", cispo_weight_max=5.0)
    torch.testing.assert_close(loss, torch.tensor([0.346574, 1.386294, -20.794415], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, torch.tensor([-0.5, 2.0, -10.0], dtype=torch.float64))
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3) and m["clip_frac_low"].item() == 0.0
    assert m["gate_mean"].item() == pytest.approx((1 + 1 + 5 / 8) / 3)


def test_cispo_never_zeroes_a_gradient_where_ppo_clip_does():
    # r = 1.5, A = 1: ppo_clip takes the clipped branch (no gradient), CISPO keeps -A r
    _, grad_clip, _ = _loss_and_grad(_inp([1.5], [1.0]))
    _, grad_cispo, _ = _loss_and_grad(_inp([1.5], [1.0]), policy_loss="cispo")
    assert grad_clip.item() == 0.0 and grad_cispo.item() == pytest.approx(-1.5)


def test_cispo_masked_tokens_contribute_nothing():
    loss, grad, _ = _loss_and_grad(_inp([1.2, 0.8], [1.0, 1.0], mask=[True, False]), policy_loss="cispo")
    assert loss[1].item() == 0.0 and grad[1].item() == 0.0
