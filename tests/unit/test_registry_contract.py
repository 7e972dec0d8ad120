"""Contract every registry entry must meet, whatever it computes: one signature over the typed input,
output shapes, finiteness, and gradients only where they belong. New entries are picked up automatically."""

import importlib
import math
import pkgutil

import pytest
import torch

import rewards
import rl.algorithms
from rl.algorithms import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SHAPING,
    AGG_MODES,
    POLICY_LOSS_METRICS,
    POLICY_LOSSES,
    AdvantageInput,
    AlgorithmConfig,
    PolicyLossInput,
    aggregate_loss,
)
from rewards import REWARD_REGISTRY, RewardSpec, check_spec, load_reward
from rewards.base import SMOKE_REQUEST, call_reward
import rl.data
import trainers.kinds
from rl.data.benchmarks import BUILTIN_BENCHMARKS
from rl.registry import Registry
from trainers.kinds import KINDS

# the rollout kinds' contract is tests/unit/test_kind_contract.py; the built-in benchmarks' is below
COVERED = {id(ADVANTAGE_ESTIMATORS), id(POLICY_LOSSES), id(ADVANTAGE_SHAPING), id(REWARD_REGISTRY), id(KINDS),
           id(BUILTIN_BENCHMARKS)}


def _algorithm_modules():
    for mod in pkgutil.iter_modules(rl.algorithms.__path__):
        yield importlib.import_module(f"rl.algorithms.{mod.name}")


def _reward_modules():
    for mod in pkgutil.iter_modules(rewards.__path__):
        if not mod.name.startswith("_"):  # _forkserver_preload warms a worker up on import
            yield importlib.import_module(f"rewards.{mod.name}")


def _other_modules():
    for package in (rl.data, trainers.kinds):
        for mod in pkgutil.iter_modules(package.__path__):
            yield importlib.import_module(f"{package.__name__}.{mod.name}")
    yield trainers.kinds


def test_every_registry_has_a_contract():
    for module in [*_algorithm_modules(), *_reward_modules(), *_other_modules()]:
        for name, obj in vars(module).items():
            if isinstance(obj, Registry):
                assert id(obj) in COVERED, f"registry {module.__name__}.{name} has no contract test"


def test_no_extension_point_is_a_plain_dict():
    """A name -> function table must be a ``Registry``: a plain dict escapes the contract tests here."""
    for module in [*_algorithm_modules(), *_reward_modules(), *_other_modules()]:
        for name, obj in vars(module).items():
            if isinstance(obj, dict) and obj and all(isinstance(k, str) and callable(v) for k, v in obj.items()):
                raise AssertionError(f"{module.__name__}.{name} maps names to functions: make it a Registry")


def _advantage_input(seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = [f"p{i}" for i in [0, 1, 0, 2, 1, 0, 3, 2, 1, 0, 4, 4]]  # sizes 4, 3, 2, 1, 2; interleaved
    rewards = torch.randint(0, 2, (len(groups),), generator=g).float() + 0.1 * torch.rand(len(groups), generator=g)
    rewards[10] = rewards[11]  # group p4 is all-equal
    return AdvantageInput(rewards, groups)


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATORS.names())
@pytest.mark.parametrize("norm", [True, False])
def test_advantage_estimator_contract(name, norm):
    cfg = AlgorithmConfig(advantage_estimator=name, norm_adv_by_std=norm)
    inp = _advantage_input()
    inp.rewards.requires_grad_(True)
    adv = ADVANTAGE_ESTIMATORS.get(name)(inp, cfg)
    assert adv.shape == inp.rewards.shape and adv.dtype == inp.rewards.dtype
    assert torch.isfinite(adv).all()
    assert not adv.requires_grad  # advantages are constants for the policy loss
    # permutation equivariance: shuffling samples shuffles advantages
    perm = torch.randperm(len(inp.group_ids), generator=torch.Generator().manual_seed(1))
    shuffled = AdvantageInput(inp.rewards.detach()[perm], [inp.group_ids[i] for i in perm])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS.get(name)(shuffled, cfg), adv[perm])
    assert set(ADVANTAGE_ESTIMATORS.capabilities(name)) >= {"needs_ref_logprobs", "needs_step_ids"}


def _loss_input(seed=0, on_policy=False):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([3, 1, 5, 2])
    seq_index = torch.repeat_interleave(torch.arange(4), lens)
    t = seq_index.numel()
    old = -torch.rand(t, generator=g, dtype=torch.float64) * 3
    logp = old.clone() if on_policy else old + 0.3 * torch.randn(t, generator=g, dtype=torch.float64)
    seq_adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.ones(t, dtype=torch.bool)
    mask[[0, 6]] = False
    return PolicyLossInput(
        logp=logp.requires_grad_(True),
        old_logp=old.requires_grad_(True),  # must be treated as a constant
        advantages=seq_adv[seq_index].requires_grad_(True),  # must be treated as a constant
        mask=mask,
        seq_index=seq_index,
        num_seqs=4,
    )


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_policy_loss_contract(name):
    inp = _loss_input()
    out = POLICY_LOSSES.get(name)(inp, AlgorithmConfig(policy_loss=name, dual_clip_c=3.0))
    assert out.per_token_loss.shape == inp.logp.shape
    assert torch.isfinite(out.per_token_loss).all()
    assert torch.equal(out.per_token_loss[~inp.mask], torch.zeros(2, dtype=torch.float64))
    assert tuple(out.metrics) == POLICY_LOSS_METRICS  # every loss reports the same keys
    for key, value in out.metrics.items():
        assert value.dim() == 0 and torch.isfinite(value) and not value.requires_grad, key
    out.per_token_loss.sum().backward()
    assert inp.old_logp.grad is None and inp.advantages.grad is None
    assert torch.isfinite(inp.logp.grad).all()
    assert torch.equal(inp.logp.grad[~inp.mask], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_policy_loss_on_policy_gradient_is_vanilla_policy_gradient(name):
    """At ratio 1 every surrogate's gradient w.r.t. logp_t is -A_t on masked-in tokens."""
    inp = _loss_input(on_policy=True)
    out = POLICY_LOSSES.get(name)(inp, AlgorithmConfig(policy_loss=name))
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), inp.logp)
    expected = torch.where(inp.mask, -inp.advantages.detach(), torch.zeros_like(grad))
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_aggregates_to_finite_scalar(name, mode):
    inp = _loss_input(seed=3)
    out = POLICY_LOSSES.get(name)(inp, AlgorithmConfig(policy_loss=name))
    loss = aggregate_loss(out.per_token_loss, inp.mask, inp.seq_index, mode,
                          global_num_tokens=float(inp.mask.sum()), global_num_seqs=4, const_len=8)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(inp.logp.grad).all() and inp.logp.grad.abs().sum() > 0


def _shaping_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 8
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    adv[:2] = 0.0  # an all-equal group's zero advantages
    correct = torch.rand(n, generator=g) > 0.5
    seq_logprob_sum = -torch.rand(n, generator=g, dtype=torch.float64) * 40
    lengths = torch.randint(0, 30, (n,), generator=g)  # a zero length included in most draws
    return adv, correct, seq_logprob_sum, lengths


@pytest.mark.parametrize("name", ADVANTAGE_SHAPING.names())
@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_advantage_shaping_contract(name, norm):
    cfg = AlgorithmConfig(advantage_shaping=name, ds_logprob_norm=norm)
    adv, correct, seq_logprob_sum, lengths = _shaping_args()  # adv: an estimator's output, already a constant
    shaped, metrics = ADVANTAGE_SHAPING.get(name)(adv, correct, seq_logprob_sum.requires_grad_(True), lengths, cfg)
    assert shaped.shape == adv.shape and shaped.dtype == adv.dtype
    assert torch.isfinite(shaped).all()
    assert not shaped.requires_grad  # no gradient leaks in from the log-probs: advantages are constants
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in metrics.items())
    # permutation equivariance: shaping is per sample
    perm = torch.randperm(len(adv), generator=torch.Generator().manual_seed(1))
    shaped_perm, _ = ADVANTAGE_SHAPING.get(name)(adv[perm], correct[perm], seq_logprob_sum.detach()[perm],
                                                  lengths[perm], cfg)
    torch.testing.assert_close(shaped_perm, shaped[perm])
    # an entry that declares no need for sequence log-probs must not read them (the driver may not compute them)
    if not ADVANTAGE_SHAPING.capabilities(name)["needs_sequence_logprobs"]:
        nan = torch.full_like(seq_logprob_sum.detach(), float("nan"))
        unread, _ = ADVANTAGE_SHAPING.get(name)(adv, correct, nan, lengths, cfg)
        torch.testing.assert_close(unread, shaped)
    assert cfg.needs_sequence_logprobs == ADVANTAGE_SHAPING.capabilities(name)["needs_sequence_logprobs"]


@pytest.mark.parametrize("name", REWARD_REGISTRY.names())
def test_reward_contract(name):
    """Every registered reward: described, its default kwargs pass the early check, it loads by name with the
    common signature, and grades the smoke request (``ok``, a finite score; a verifier gives a verdict)."""
    caps = REWARD_REGISTRY.capabilities(name)
    assert isinstance(caps["description"], str) and caps["description"].strip()
    assert isinstance(caps["is_verifier"], bool)
    check_spec(RewardSpec(name))
    entry = load_reward(RewardSpec(name))
    assert entry.fn is REWARD_REGISTRY.get(name) and entry.is_verifier == caps["is_verifier"]
    if entry.self_test is not None:
        entry.self_test()
    result = call_reward(entry, SMOKE_REQUEST)
    assert result.status == "ok", result.error
    assert math.isfinite(result.score)
    if entry.is_verifier:
        assert isinstance(result.correct, bool)


@pytest.mark.parametrize("name", BUILTIN_BENCHMARKS.names())
def test_builtin_benchmark_contract(name):
    """A built-in benchmark gives distinct, answered prompts, and a smaller limit is a prefix of a larger one."""
    small, large = BUILTIN_BENCHMARKS.get(name)(5), BUILTIN_BENCHMARKS.get(name)(12)
    assert len(small) == 5 and len(large) == 12 and large[:5] == small
    assert len({it.id for it in large}) == 12 and all(it.prompt and it.answer for it in large)
