"""GDRO controllers: hand-computed numbers from docs/algorithms.md "GDRO" plus edge cases."""

import json
import math
import random

import pytest
from pydantic import ValidationError

from rl.algorithms.gdro import (
    GdroConfig,
    GdroController,
    PassKClassifier,
    PromptGdro,
    RolloutGdro,
    cap_mean_normalized,
    entropic_risk,
    largest_remainder,
    per_bin_mean,
    variance_proxy,
)

THREE_BINS = [0.4, 0.75]


def _cfg(**kw):
    return GdroConfig(**{"bin_edges": THREE_BINS, **kw})


# ----------------------------------------------------------------------------------------------- config


def test_config_defaults_and_bins():
    cfg = GdroConfig()
    assert (cfg.eta, cfg.uniform_mix, cfg.weight_cap, cfg.ema_rate) == (0.65, 0.01, 15.0, 0.12)
    assert (cfg.n_mean, cfg.n_min, cfg.n_max) == (4, 2, 12)
    assert cfg.num_bins == 7 and _cfg().num_bins == 3


def test_config_unknown_key_suggests_nearest():
    with pytest.raises(ValidationError, match="Did you mean 'weight_cap'"):
        GdroConfig(weight_capp=3.0)


@pytest.mark.parametrize(
    "kw",
    [{"bin_edges": [0.5, 0.4]}, {"bin_edges": [0.0, 0.5]}, {"bin_edges": [0.5, 1.0]}, {"unseen_bin": 3},
     {"n_mean": 13}, {"n_min": 5}, {"weight_cap": 0.5}, {"hysteresis": 0.5}],
)
def test_config_rejects_invalid(kw):
    with pytest.raises(ValidationError):
        _cfg(**kw)


# ----------------------------------------------------------------------------------------------- helpers


def test_entropic_surrogate_bounds():
    r = entropic_risk([0.0, 1.0], eta=1.0)
    assert r == pytest.approx(math.log(1 + math.e)) and r == pytest.approx(1.3133, abs=1e-4)
    assert 1.0 <= r <= 1.0 + math.log(2)


def test_square_root_law_variance_proxy():
    # q = [0.5, 0.5], v = [1, 9], n_mean = 4 -> n* = [2, 6]; VarProxy 1.0 vs uniform 1.25.
    ro = RolloutGdro(_cfg(rollout_gdro=True, bin_edges=[0.5]))
    ro.variances = [1.0, 9.0]
    targets, mu = ro.bin_targets({0: 1, 1: 1})
    assert targets == pytest.approx({0: 2.0, 1: 6.0}) and mu == pytest.approx(0.25)
    assert variance_proxy([0.5, 0.5], [1, 9], [2, 6]) == pytest.approx(1.0)
    assert variance_proxy([0.5, 0.5], [1, 9], [4, 4]) == pytest.approx(1.25)


def test_cap_renormalize_one_pass_and_two_passes():
    # [4,1,1,1,1] -> mean-1 [2.5, .625 x4]; cap 2: clamp gives mean 0.9, water-filling gives [2, .75 x4].
    assert cap_mean_normalized([4, 1, 1, 1, 1], 2.0, renormalize=False) == pytest.approx([2, .625, .625, .625, .625])
    assert cap_mean_normalized([4, 1, 1, 1, 1], 2.0) == pytest.approx([2, .75, .75, .75, .75])
    # [8,3,1,1,1,1] -> [3.2, 1.2, .4 x4]; cap 1.5 first caps 3.2, then 1.2*4.5/2.8 = 1.93 > 1.5 too -> [1.5,1.5,.75 x4].
    assert cap_mean_normalized([8, 3, 1, 1, 1, 1], 1.5) == pytest.approx([1.5, 1.5, .75, .75, .75, .75])


def test_largest_remainder_ties_and_surplus():
    assert largest_remainder([2.5, 2.5, 2.5, 2.5], 10, 1, 5) == [3, 3, 2, 2]  # ties -> earlier index
    assert largest_remainder([2.2, 3.7, 4.1], 10, 1, 5) == [2, 4, 4]  # 9 floored, +1 to frac .7
    assert largest_remainder([5.0, 5.0, 5.0], 12, 2, 6) == [4, 4, 4]  # surplus removed
    assert largest_remainder([1.99999999, 6.00000001], 8, 2, 12) == [2, 6]  # fp noise at a bound


# ----------------------------------------------------------------------------------------------- classifier


def _set_acc(clf, pid, acc_percent):
    """With passk_k=1 and window 1 the accuracy is exactly this step's fraction correct."""
    return clf.update(pid, acc_percent, 100)


def test_classifier_hysteresis_reference_cases():
    clf = PassKClassifier(_cfg(passk_k=1, passk_window=1, hysteresis=0.03))
    assert _set_acc(clf, "x", 0) == 0
    assert _set_acc(clf, "x", 41) == 0  # 0.41 < 0.40 + 0.03: stays
    assert _set_acc(clf, "x", 44) == 1  # 0.44 >= 0.43: up
    assert _set_acc(clf, "x", 38) == 1  # 0.38 > 0.37: stays
    assert _set_acc(clf, "x", 36) == 0  # 0.36 < 0.37: down


def test_classifier_wobble_at_threshold():
    sticky = PassKClassifier(_cfg(passk_k=1, passk_window=1, hysteresis=0.03))
    plain = PassKClassifier(_cfg(passk_k=1, passk_window=1, hysteresis=0.0))
    for clf in (sticky, plain):
        _set_acc(clf, "x", 60)
    sticky_bins = [_set_acc(sticky, "x", a) for a in [39, 41, 39, 41, 38]]
    plain_bins = [_set_acc(plain, "x", a) for a in [39, 41, 39, 41, 38]]
    assert sticky_bins == [1, 1, 1, 1, 1]
    assert plain_bins == [0, 1, 0, 1, 0]


def test_classifier_jumps_several_bins_and_first_visit_has_no_hysteresis():
    clf = PassKClassifier(_cfg(passk_k=1, passk_window=1, hysteresis=0.03))
    assert _set_acc(clf, "y", 41) == 1  # first visit: raw bin of 0.41
    assert _set_acc(clf, "y", 100) == 2
    assert _set_acc(clf, "y", 0) == 0


def test_classifier_any_correct_window_and_unseen():
    clf = PassKClassifier(_cfg(passk_window=2, unseen_bin=2))
    assert clf.bin_of("new") == 2 and clf.accuracy("new") is None
    clf.update("p", 1, 4)  # any correct -> c = 1
    clf.update("p", 0, 4)
    assert clf.accuracy("p") == 0.5
    clf.update("p", 0, 4)  # window 2: [0, 0]
    assert clf.accuracy("p") == 0.0
    cum = PassKClassifier(_cfg(passk_window=0))
    for c in [1, 0, 0]:
        cum.update("p", c, 4)
    assert cum.accuracy("p") == pytest.approx(1 / 3)


def test_classifier_pass_at_k_visit_value():
    clf = PassKClassifier(_cfg(passk_k=2, passk_window=1))
    clf.update("p", 2, 5)
    assert clf.accuracy("p") == pytest.approx(0.7)
    clf.update("p", 1, 1)  # k clipped to n = 1
    assert clf.accuracy("p") == 1.0


def test_classifier_rejects_bad_counts_and_skips_empty():
    clf = PassKClassifier(_cfg())
    with pytest.raises(ValueError, match="num_correct"):
        clf.update("p", 3, 2)
    assert clf.update("p", 0, 0) == 0 and "p" not in clf.records


# ----------------------------------------------------------------------------------------------- Prompt-GDRO


def test_prompt_gdro_reference_weights():
    pg = PromptGdro(_cfg(prompt_gdro=True))
    pg.scores = [0.2, 0.0, -0.1]
    q = pg.probs([0, 1, 2])
    assert [q[b] for b in range(3)] == pytest.approx([0.36987, 0.32519, 0.30494], abs=1e-5)
    assert pg.weights([0, 0, 1, 2]) == pytest.approx([1.08002, 1.08002, 0.94955, 0.89040], abs=1e-5)


def test_prompt_gdro_ema_and_first_observation():
    pg = PromptGdro(_cfg(prompt_gdro=True))
    pg.update({1: 0.5})
    assert pg.scores == [None, 0.5, None]
    pg.scores[0] = 0.2
    pg.update({0: 0.5})
    assert pg.scores[0] == pytest.approx(0.236) and pg.scores[1] == 0.5


def test_prompt_gdro_softmax_matches_entropic_best_response():
    pg = PromptGdro(_cfg(prompt_gdro=True, eta=1.0, uniform_mix=0.0, bin_edges=[0.5]))
    pg.scores = [0.0, 1.0]
    q = pg.probs([0, 1])
    assert [q[0], q[1]] == pytest.approx([0.2689, 0.7311], abs=1e-4)


def test_prompt_gdro_weight_cap_binds():
    # q ~ [9, 1]; batch bins [0,1,1,1] -> mean-1 [3, 1/3 x3]; cap 2.
    kw = {"prompt_gdro": True, "eta": 1.0, "uniform_mix": 0.0, "weight_cap": 2.0, "bin_edges": [0.5]}
    pg = PromptGdro(_cfg(**kw))
    pg.scores = [math.log(9.0), 0.0]
    assert pg.weights([0, 1, 1, 1]) == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3])
    clamp = PromptGdro(_cfg(**kw, renormalize_after_cap=False))
    clamp.scores = pg.scores
    assert clamp.weights([0, 1, 1, 1]) == pytest.approx([2.0, 1 / 3, 1 / 3, 1 / 3])


def test_prompt_gdro_single_bin_and_absent_bin():
    pg = PromptGdro(_cfg(prompt_gdro=True))
    pg.scores = [0.2, 100.0, -0.1]
    assert pg.weights([2, 2, 2]) == [1.0, 1.0, 1.0]
    # bin 1 is absent: its huge score must not matter; gamma/B uses B = 2 present bins.
    w = pg.weights([0, 2])
    e0, e2 = math.exp(0.65 * 0.2), math.exp(0.65 * -0.1)
    q0, q2 = 0.99 * e0 / (e0 + e2) + 0.005, 0.99 * e2 / (e0 + e2) + 0.005
    assert w == pytest.approx([2 * q0 / (q0 + q2), 2 * q2 / (q0 + q2)])
    assert pg.weights([]) == []


def test_score_clip():
    pg = PromptGdro(_cfg(prompt_gdro=True, score_clip=1.0, uniform_mix=0.0, eta=1.0, bin_edges=[0.5]))
    pg.scores = [50.0, 0.0]
    q = pg.probs([0, 1])
    assert q[0] == pytest.approx(math.e / (math.e + 1))


def test_per_bin_mean():
    assert per_bin_mean([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.8]) == pytest.approx({0: 0.2, 1: 0.8})


# ----------------------------------------------------------------------------------------------- Rollout-GDRO


def test_rollout_reference_allocation_two_prompts_per_bin():
    # counts {A: 2, B: 2}, budget 16, v = [1, 9] -> A gets 2, B gets 6.
    ro = RolloutGdro(_cfg(rollout_gdro=True, bin_edges=[0.5]))
    ro.variances = [1.0, 9.0]
    alloc = ro.allocate([0, 1, 1, 0])
    assert alloc.n == [2, 6, 6, 2] and sum(alloc.n) == 16


def test_rollout_clip_binds_and_rest_is_redistributed():
    # counts {0: 2, 1: 3}, v = [1, 9], budget 20: unclipped n_0 = 20/11 < 2, so n_0 = 2 and bin 1 shares 16:
    # 16/3 = 5.333 -> [5, 5, 5] + 1 to the first -> [6, 5, 5].
    ro = RolloutGdro(_cfg(rollout_gdro=True, bin_edges=[0.5]))
    ro.variances = [1.0, 9.0]
    alloc = ro.allocate([0, 1, 0, 1, 1])
    assert alloc.bin_targets == pytest.approx({0: 2.0, 1: 16 / 3})
    assert alloc.shadow_price == pytest.approx((9 / 16) ** 2)  # sqrt(9 / mu) = 16/3
    assert alloc.n == [2, 6, 2, 5, 5]


def test_rollout_one_bin_equal_variances_and_degenerate_bounds():
    ro = RolloutGdro(_cfg(rollout_gdro=True))
    assert ro.allocate([1, 1, 1]).n == [4, 4, 4]
    ro.variances = [0.2, None, 0.2]  # None -> prior 0.25
    assert ro.allocate([0, 2, 0, 2]).n == [4, 4, 4, 4]
    fixed = RolloutGdro(_cfg(rollout_gdro=True, n_min=4, n_max=4))
    fixed.variances = [0.01, 0.2, 0.25]
    assert fixed.allocate([0, 1, 2]).n == [4, 4, 4]
    at_max = RolloutGdro(_cfg(rollout_gdro=True, n_mean=12))
    at_max.variances = [0.01, 0.2, 0.25]
    assert at_max.allocate([0, 1, 2]).n == [12, 12, 12]
    assert ro.allocate([]).n == []


def test_rollout_zero_variance_bin_gets_n_min():
    ro = RolloutGdro(_cfg(rollout_gdro=True))
    ro.variances = [0.0, 0.25, 0.0]  # floored at 1e-4
    alloc = ro.allocate([0, 1, 1, 2])
    assert alloc.n[0] == 2 and alloc.n[3] == 2 and alloc.n[1] + alloc.n[2] == 12


@pytest.mark.parametrize("seed", range(200))
def test_rollout_budget_exactly_held(seed):
    rng = random.Random(seed)
    n_min = rng.randint(1, 4)
    n_max = rng.randint(n_min, 16)
    n_mean = rng.randint(n_min, n_max)
    edges = sorted(rng.sample([i / 20 for i in range(1, 20)], rng.randint(0, 8)))
    ro = RolloutGdro(GdroConfig(rollout_gdro=True, bin_edges=edges, n_mean=n_mean, n_min=n_min, n_max=n_max))
    ro.variances = [rng.choice([None, 0.0, rng.random() * 0.25]) for _ in range(len(edges) + 1)]
    bins = [rng.randrange(len(edges) + 1) for _ in range(rng.randint(1, 300))]
    alloc = ro.allocate(bins)
    assert sum(alloc.n) == n_mean * len(bins)
    assert all(n_min <= n <= n_max for n in alloc.n)
    # continuous targets meet the budget and each integer is within 1 of its target
    counts = {b: bins.count(b) for b in set(bins)}
    assert sum(counts[b] * t for b, t in alloc.bin_targets.items()) == pytest.approx(n_mean * len(bins))
    assert all(abs(n - alloc.bin_targets[b]) < 1 for n, b in zip(alloc.n, bins))


def test_rollout_variance_ema():
    ro = RolloutGdro(_cfg(rollout_gdro=True))
    ro.update({0: 0.2})
    ro.update({0: 0.1, 2: 0.05})
    assert ro.variances[0] == pytest.approx(0.6 * 0.2 + 0.4 * 0.1) and ro.variances[2] == 0.05
    assert ro.variance(1) == 0.25


# ----------------------------------------------------------------------------------------------- facade


IDS = ["a", "b", "c", "d"]


def test_facade_off_is_identity():
    g = GdroController(_cfg())
    assert g.n_per_prompt(IDS) == [4, 4, 4, 4]
    assert g.sample_weights(IDS) == [1.0] * 4
    g.update(IDS, [[True], [False, True], [], [False] * 3])  # no loss signal needed when off
    m = g.metrics()
    assert m["gdro/classifier/prompts_seen"] == 3.0
    assert all(k.startswith("gdro/") for k in m)


def test_facade_first_step_is_uniform_then_uses_bins():
    g = GdroController(_cfg(rollout_gdro=True, prompt_gdro=True, loss_signal="error_rate", hysteresis=0.0))
    assert g.n_per_prompt(IDS) == [4, 4, 4, 4]
    assert g.sample_weights(IDS) == [1.0] * 4
    # a: never correct (bin 0); b: always (bin 2); c, d: any-correct -> bin 2 too (window of visits).
    g.update(IDS, [[False] * 4, [True] * 4, [True, False, True, False], [True, False, False, False]])
    assert [g.classifier.bin_of(p) for p in IDS] == [0, 2, 2, 2]
    # error rates: bin 0: 1.0; bin 2: mean(0, .5, .75) = 0.41667; divided by shares 1/4 and 3/4
    assert g.prompt.scores[0] == pytest.approx(4.0) and g.prompt.scores[2] == pytest.approx(0.41667 / 0.75, abs=1e-5)
    # bin variances: bin 0: 0; bin 2: mean(0, 2*2/12, 1*3/12) = 0.19444
    assert g.rollout.variances[0] == 0.0 and g.rollout.variances[2] == pytest.approx((1 / 3 + 1 / 4) / 3)
    n = g.n_per_prompt(IDS)
    assert sum(n) == 16 and n[0] == 2
    w = g.sample_weights(IDS)
    assert w[0] > w[1] == w[2] == w[3] and sum(w) == pytest.approx(4.0)
    m = g.metrics()
    assert m["gdro/batch/prompts_bin2"] == 3.0 and m["gdro/rollout/budget_realized"] == 4.0
    assert m["gdro/rollout/n_mean_bin0"] == 2.0 and m["gdro/prompt/weight_bin0"] == w[0]
    assert m["gdro/rollout/shadow_price"] > 0


def test_facade_single_sample_groups():
    g = GdroController(_cfg(rollout_gdro=True, prompt_gdro=True, loss_signal="error_rate"))
    g.update(["a", "b"], [[True], [False]])
    assert g.rollout.variances == [None, None, None]  # n = 1 carries no variance estimate
    assert g.prompt.scores[0] == pytest.approx(1.0 / 0.5) and g.prompt.scores[2] == 0.0


def test_facade_pg_loss_signal_sources():
    cfg = _cfg(prompt_gdro=True, loss_norm_by_share=False)
    g = GdroController(cfg)
    with pytest.raises(ValueError, match="loss_signal"):
        g.update(["a"], [[True, False]])
    assert g.classifier.records == {}  # a rejected update changes nothing
    g.update(["a", "b"], [[False, False], [False]], losses=[0.3, 0.1])
    assert g.prompt.scores[0] == pytest.approx(0.2)
    h = GdroController(cfg)
    h.update(["a", "b"], [[False, False], [False, False]], advantages=[[0.5, -0.1], [0.0, 0.0]])
    assert h.prompt.scores[0] == pytest.approx(-0.1)  # mean of (-0.2, 0.0)
    with pytest.raises(ValueError, match="losses entries"):
        h.update(["a", "b"], [[True], [True]], losses=[0.1])


def _random_step(rng, ids):
    correct = [[rng.random() < 0.5 for _ in range(rng.randint(0, 6))] for _ in ids]
    advantages = [[rng.gauss(0, 1) for _ in c] for c in correct]
    losses = [rng.gauss(0, 0.1) for _ in ids]
    return correct, advantages, losses


def test_state_dict_json_round_trip_reproduces_decisions():
    cfg = GdroConfig(rollout_gdro=True, prompt_gdro=True, passk_window=3)
    rng = random.Random(0)
    pool = [f"p{i}" for i in range(40)]
    g = GdroController(cfg)
    for _ in range(15):
        ids = rng.sample(pool, 12)
        g.n_per_prompt(ids), g.sample_weights(ids)
        g.update(ids, *_random_step(rng, ids))
    blob = json.dumps(g.state_dict())
    h = GdroController(cfg)
    h.load_state_dict(json.loads(blob))
    assert json.dumps(h.state_dict()) == blob
    for _ in range(10):
        ids = rng.sample(pool + ["new1", "new2"], 12)
        assert g.n_per_prompt(ids) == h.n_per_prompt(ids)
        assert g.sample_weights(ids) == h.sample_weights(ids)
        step = _random_step(rng, ids)
        g.update(ids, *step)
        h.update(ids, *step)
        assert g.metrics() == h.metrics()


def test_load_state_dict_rejects_other_bins():
    state = GdroController(_cfg()).state_dict()
    with pytest.raises(ValueError, match="bin_edges"):
        GdroController(GdroConfig()).load_state_dict(state)
