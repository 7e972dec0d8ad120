"""The adaptive speculative-decoding policy (schedules, bandit rewards from engine step statistics, phase
metrics), the engine-core step timer, the drafter config checks, and the learner's online drafter (hidden states
from its own log-prob pass, training, export, checkpoint)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from rl.config import ConfigError, load_config
from rollout.drafter.bandit import SpecTokensBanditConfig
from rollout.drafter.online import OnlineDrafterConfig
from rollout.drafter.policy import SpecPolicy, StepRow, merge_rows, phase_metrics
from rollout.vllm_plugin import _StepTimer



def drafter_config(*overrides: str) -> OnlineDrafterConfig:
    """The drafter section's training part, as the driver sends it to the learner."""
    return OnlineDrafterConfig.from_section(load_config(None, list(overrides)).drafter.model_dump())

def test_fixed_schedule_speculates_only_in_the_long_tail():
    p = SpecPolicy("fixed", 3, long_tail_threshold=16, max_batch_size=256)
    assert p.next_schedule() == [(1, 16, 3), (17, 256, 0)]
    assert SpecPolicy("fixed", 2, None, max_batch_size=64).next_schedule() == [(1, 64, 2)]
    # observe only reports the K each bucket ran
    assert p.observe([StepRow(4, 3, 10, 50, 1.0)]) == {"rollout/spec/k_1_16": 3.0, "rollout/spec/k_17_256": 0.0}


def test_bucket_reward_is_per_sequence_speed():
    """One bucket (batch sizes 1-4). K=0 ran at batch 4, each sequence gaining 100 tokens/s (400 tokens/s in all);
    K=2 ran at batch 1 at 150 tokens/s. Total throughput would prefer K=0 only because of where it ran."""
    cfg = SpecTokensBanditConfig(arms=(0, 2), batch_size_bounds=(4, 64), policy="epsilon_greedy", epsilon=0.0)
    p = SpecPolicy("adaptive", 2, long_tail_threshold=4, bandit=cfg, max_batch_size=64, min_seconds=0.01)
    out = p.observe([StepRow(4, 0, 10, 400.0, 1.0), StepRow(1, 2, 10, 150.0, 1.0)])
    assert out["rollout/spec/reward_1_4_k0"] == pytest.approx(100.0)
    assert out["rollout/spec/reward_1_4_k2"] == pytest.approx(150.0)
    assert p.bandit.best(2) == 2
    # several batch sizes in one observation: sum of tokens_b / b over the summed seconds
    out = p.observe([StepRow(2, 2, 5, 200.0, 0.5), StepRow(3, 2, 5, 450.0, 1.5)])
    assert out["rollout/spec/reward_1_4_k2"] == pytest.approx((200 / 2 + 450 / 3) / 2.0)


def test_adaptive_schedule_explores_below_the_threshold_and_is_off_above():
    cfg = SpecTokensBanditConfig(arms=(0, 1, 3), batch_size_bounds=(2, 8, 64), policy="ucb1")
    p = SpecPolicy("adaptive", 3, long_tail_threshold=8, bandit=cfg, max_batch_size=100)
    assert p.buckets() == [(1, 2), (3, 8), (9, 100)]
    first = p.next_schedule()
    assert first == [(1, 2, 0), (3, 8, 0), (9, 100, 0)]  # untried arms are played in order: 0 first
    with pytest.raises(ValueError, match="one of the bucket bounds"):
        SpecPolicy("adaptive", 3, long_tail_threshold=5, bandit=cfg)
    with pytest.raises(ValueError, match="exceed num_speculative_tokens"):
        SpecPolicy("adaptive", 2, long_tail_threshold=8, bandit=cfg)


def test_bandit_learns_the_faster_k_per_bucket_from_step_rows():
    """Synthetic engine: at batch size 1-2, K=3 gives 3x the tokens/s of no speculation; at 3-8, drafting costs
    more than it saves (K=0 best). The policy must settle on those arms; above the threshold K stays 0."""
    cfg = SpecTokensBanditConfig(arms=(0, 1, 3), batch_size_bounds=(2, 8, 64), policy="epsilon_greedy",
                                 epsilon=0.1, seed=0)
    p = SpecPolicy("adaptive", 3, long_tail_threshold=8, bandit=cfg, max_batch_size=64, min_seconds=0.01)
    speed = {(1, 0): 100.0, (1, 1): 180.0, (1, 3): 300.0, (3, 0): 800.0, (3, 1): 700.0, (3, 3): 500.0}
    rng = random.Random(0)
    for _ in range(60):
        sched = p.next_schedule()
        rows = []
        for lo, hi, k in sched:
            b = rng.randint(lo, hi)
            secs = 0.5
            tps = speed.get((1 if lo == 1 else 3, k), 1000.0) * rng.uniform(0.9, 1.1)
            rows.append(StepRow(b, k, 10, tps * secs, secs))
        out = p.observe(rows)
        assert "rollout/spec/k_9_64" in out and out["rollout/spec/k_9_64"] == 0.0
    assert p.bandit.best(1) == 3
    assert p.bandit.best(5) == 0
    # a bucket's too-short observation is ignored
    before = list(p.bandit.buckets[0].counts)
    p.observe([StepRow(1, 3, 1, 5, 0.001)])
    assert p.bandit.buckets[0].counts == before
    # state round trip
    q = SpecPolicy("adaptive", 3, long_tail_threshold=8, bandit=cfg, max_batch_size=64)
    q.load_state_dict(p.state_dict())
    assert q.bandit.best(1) == 3 and q.current == p.current
    fixed = SpecPolicy("fixed", 3, long_tail_threshold=8, max_batch_size=64)  # resuming in another mode
    fixed.load_state_dict(p.state_dict())
    assert fixed.next_schedule() == [(1, 8, 3), (9, 64, 0)]


def test_merge_rows_and_phase_metrics_by_hand():
    rows = merge_rows([[[1, 3, 2, 10, 0.5], [32, 0, 1, 32, 0.25]], [[1, 3, 1, 5, 0.25], [4, 0, 4, 16, 1.0]]])
    assert rows == [StepRow(1, 3, 3, 15, 0.75), StepRow(4, 0, 4, 16, 1.0), StepRow(32, 0, 1, 32, 0.25)]
    m = phase_metrics(rows, long_tail_threshold=8)
    assert m["rollout/spec/decode_s"] == pytest.approx(2.0)
    assert m["rollout/spec/long_tail_time_frac"] == pytest.approx(1.75 / 2.0)
    assert m["rollout/spec/long_tail_tokens_per_s_sd"] == pytest.approx(15 / 0.75)
    assert m["rollout/spec/long_tail_tokens_per_s_no_sd"] == pytest.approx(16 / 1.0)
    assert m["rollout/spec/bulk_tokens_per_s_no_sd"] == pytest.approx(32 / 0.25)
    assert "rollout/spec/bulk_tokens_per_s_sd" not in m  # no steps behind it
    assert m["rollout/spec/tokens_per_step"] == pytest.approx(63 / 8)
    assert phase_metrics([], 8) == {"rollout/spec/decode_s": 0.0}


def test_step_timer_counts_decode_steps_per_batch_size_and_k():
    """vLLM's scheduler stand-in: schedule() then update_from_output(); prefill steps (new requests, or more than
    1 + K tokens for a request) are not counted."""

    class Sched:
        num_spec_tokens = 3
        dynamic_sd_lookup = [0, 3, 3, 1, 1]

        def schedule(self):
            return self.next_output

        def update_from_output(self, so, mro):
            return "outputs"

    sched = Sched()
    timer = _StepTimer(sched)

    def step(num_tokens: dict, new: bool, sampled: list[list[int]]):
        sched.next_output = SimpleNamespace(num_scheduled_tokens=num_tokens, scheduled_new_reqs=["r"] if new else [])
        so = sched.schedule()
        assert sched.update_from_output(so, SimpleNamespace(sampled_token_ids=sampled)) == "outputs"

    step({"a": 5, "b": 7}, True, [[1], [2]])  # prefill
    step({"a": 4, "b": 3}, False, [[1, 2, 3], [4]])  # batch 2 -> K 3
    step({"a": 4, "b": 4}, False, [[1, 2], [3, 4, 5, 6]])
    step({"a": 2, "b": 2, "c": 2}, False, [[1], [2], [3, 4]])  # batch 3 -> K 1
    step({"a": 9, "b": 1, "c": 1}, False, [[1], [2], [3]])  # a prompt chunk in the batch: not a decode step
    stats = timer.stats
    assert set(stats) == {(2, 3), (3, 1)}
    assert stats[(2, 3)][:2] == [2, 10] and stats[(3, 1)][:2] == [1, 4]
    assert all(v[2] >= 0 for v in stats.values())
    sched.dynamic_sd_lookup = None
    assert timer.current_k(2) == 3


def test_drafter_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="long_tail_threshold=10 must be one of"):
        load_config(None, ["drafter.mode=adaptive", "drafter.long_tail_threshold=10"])
    with pytest.raises(ConfigError, match="exceed drafter.num_speculative_tokens=2"):
        load_config(None, ["drafter.mode=adaptive", "drafter.num_speculative_tokens=2"])
    with pytest.raises(ConfigError, match="set init_path"):
        load_config(None, ["drafter.mode=fixed", "drafter.train=false"])
    with pytest.raises(ConfigError, match="old_logprob_source=learner"):
        load_config(None, ["drafter.mode=fixed", "learner.old_logprob_source=engine"])
    # level-2 sleep keeps the drafter's own weights (sleep_preserve_parameter_names), so any publish_every works
    cfg = load_config(None, ["drafter.mode=fixed", "drafter.publish_every=2", "placement.mode=colocated"])
    assert cfg.placement.engine_sleep_level == 2 and cfg.drafter.publish_every == 2
    with pytest.raises(ConfigError, match="unknown config key 'drafter.num_spec_tokens'"):
        load_config(None, ["drafter.num_spec_tokens=3"])
    cfg = load_config("configs/drafter_tiny_cpu.yaml")
    assert cfg.drafter.mode == "adaptive" and cfg.drafter.long_tail_threshold in cfg.drafter.batch_size_bounds


# ---------------------------------------------------------------------- the learner's online drafter
@pytest.fixture(scope="module")
def learner_with_drafter(tmp_path_factory):
    from rl.algorithms import AlgorithmConfig
    from rollout.drafter.checkpoint import save_drafter
    from rollout.drafter.model import Drafter
    from tests.learner_fixtures import save_tiny_qwen2
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    root = tmp_path_factory.mktemp("online_drafter")
    model_dir = save_tiny_qwen2(root / "model", tie=False)
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(model_dir)
    drafter_dir = save_drafter(Drafter.from_target(target, seed=0), root / "drafter")
    lc = LearnerSettings(micro_batch_tokens=64, lr=1e-3)
    learner = Learner(model_dir, lc, AlgorithmConfig(kl_coef=0.0), temperature=1.0)
    section = drafter_config("drafter.mode=fixed", "drafter.buffer_dtype=float32", "drafter.batch_size=4",
                             "drafter.lr=1e-3")
    assert learner.drafter_setup(section, str(drafter_dir)) > 0
    return learner, root


def test_learner_keeps_the_hidden_states_of_its_old_logprob_pass(learner_with_drafter):
    from tests.learner_fixtures import random_samples

    learner, _ = learner_with_drafter
    assert learner.drafter_train(5.0)["drafter/steps"] == 0.0  # no data, no shared weights yet
    learner.export_weights()  # whole weights go to the engines: the drafter's shared copies follow
    assert torch.equal(learner.drafter.drafter.lm_head.weight, learner.model.lm_head.weight)
    assert torch.equal(learner.drafter.drafter.embed_tokens.weight, learner.model.model.embed_tokens.weight)
    samples = random_samples(10, seed=1)
    learner.train_step(samples)
    seqs = sorted(learner.drafter.buffer.sequences(), key=lambda s: (len(s), s.token_ids.tolist()))
    want = sorted(samples, key=lambda s: (s.num_tokens, s.prompt_token_ids + s.response_token_ids))
    assert len(seqs) == len(samples)
    for got, s in zip(seqs, want):  # the states themselves: next test
        assert got.token_ids.tolist() == s.prompt_token_ids + s.response_token_ids
        assert got.loss_mask.tolist() == [False] * len(s.prompt_token_ids) + [True] * len(s.response_token_ids)
        assert got.hidden_states.shape == (s.num_tokens, learner.model.config.hidden_size)


def test_captured_states_equal_a_transformers_forward(tmp_path):
    from rl.algorithms import AlgorithmConfig
    from rollout.drafter.capture import capture_hidden_states
    from rollout.drafter.checkpoint import save_drafter
    from rollout.drafter.model import Drafter
    from tests.learner_fixtures import random_samples, save_tiny_qwen2
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    model_dir = save_tiny_qwen2(tmp_path / "model")
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(model_dir)
    drafter_dir = save_drafter(Drafter.from_target(target, seed=0), tmp_path / "drafter")
    for packed in ("padded", "packed"):
        lc = LearnerSettings(micro_batch_tokens=40, kernels={"attention": packed})
        learner = Learner(model_dir, lc, AlgorithmConfig(kl_coef=0.0), temperature=1.0)
        learner.drafter_setup(drafter_config("drafter.mode=fixed", "drafter.buffer_dtype=float32"), str(drafter_dir))
        samples = random_samples(7, seed=2)
        got: list = []
        learner.compute_logprobs(samples, capture=got)
        assert len(got) == len(samples)
        ref = capture_hidden_states(target.eval(), [g.token_ids.tolist() for g in got], batch_size=1)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g.hidden_states, r.hidden_states, rtol=1e-5, atol=1e-5)


def test_learner_drafter_trains_exports_and_checkpoints(learner_with_drafter, tmp_path):
    from safetensors.torch import load as st_load

    from rollout.drafter.checkpoint import expected_weight_shapes
    from tests.learner_fixtures import random_samples

    learner, _ = learner_with_drafter
    learner.export_weights()
    learner.train_step(random_samples(10, seed=3))
    before = {k: v.clone() for k, v in learner.drafter.drafter.trainable_state_dict().items()}
    m = learner.drafter_train(30.0, max_steps=5)
    assert m["drafter/steps"] == 5.0 and m["drafter/loss"] > 0 and m["drafter/train_end"] >= m["drafter/train_start"]
    after = {k: v.clone() for k, v in learner.drafter.drafter.trainable_state_dict().items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    blob = learner.export_drafter()
    tensors = st_load(blob)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_weight_shapes(learner.drafter.drafter.cfg)
    learner.save(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "drafter" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "drafter_trainer.pt").is_file()
    steps_done = learner.drafter.trainer.num_steps
    learner.drafter_train(30.0, max_steps=2)
    learner.load(str(tmp_path / "ckpt"))
    assert learner.drafter.trainer.num_steps == steps_done
    for k, v in learner.drafter.drafter.trainable_state_dict().items():
        torch.testing.assert_close(v, after[k])


def test_expand_to_tokens_replaces_vllms_cpu_kernel():
    """The CPU fallback of vLLM's expand kernel never wrote float outputs (speculative sampling read uninitialized
    temperatures); ours writes each request's value over its tokens, in the output's dtype."""
    from rollout.vllm_plugin import expand_to_tokens, register

    temps = torch.tensor([0.7, -1.0, 1.5])  # -1: greedy's temperature, replaced by 1
    out = torch.full((7,), 9.0)
    expand_to_tokens(out, temps, torch.tensor([2, 2, 5], dtype=torch.int32), -1, 1)
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.5, 1.5, 1.5, 9.0, 9.0])
    top_k = torch.tensor([5, 0], dtype=torch.int32)
    out_k = torch.zeros(3, dtype=torch.int32)
    expand_to_tokens(out_k, top_k, torch.tensor([1, 3]), 0, 0)
    assert out_k.tolist() == [5, 0, 0] and out_k.dtype == torch.int32
    cpu_triton_utils = pytest.importorskip("vllm.utils.cpu_triton_utils")
    register()
    assert cpu_triton_utils._expand_kernel_impl is expand_to_tokens


def _drafter_rank_main(rank, world, port, strategy, model_dir, drafter_dir, out_path):
    from rl.algorithms import AlgorithmConfig
    from tests.learner_fixtures import random_samples
    from trainers.learner import learner_class
    from trainers.settings import LearnerSettings

    torch.set_num_threads(1)
    cfg = LearnerSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=24,
                          mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=0,
                          strategy=strategy, deepspeed={"param_persistence_threshold": 0})
    learner = learner_class(strategy)(model_dir, cfg, AlgorithmConfig(kl_coef=0.0), temperature=1.0, rank=rank,
                                      world_size=world, master=("127.0.0.1", port))
    section = drafter_config("drafter.mode=fixed", "drafter.buffer_dtype=float32", "drafter.batch_size=3")
    learner.drafter_setup(section, drafter_dir)
    learner.export_weights()
    learner.train_step(random_samples(10, seed=4))
    buffer = [(s.token_ids, s.hidden_states) for s in learner.drafter.buffer.sequences()]
    shared = (learner.drafter.drafter.embed_tokens.weight.clone(), learner.drafter.drafter.lm_head.weight.clone())
    metrics = learner.drafter_train(30.0, max_steps=2)
    torch.save({"buffer": buffer, "shared": shared, "metrics": metrics, "share": learner.drafter.batch_share,
                "weights": learner.drafter.drafter.trainable_state_dict(), "blob": learner.export_drafter()},
               out_path % rank)


@pytest.mark.multiproc
@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed"])
def test_two_learner_ranks_train_drafter_replicas_on_their_own_shares(tmp_path, strategy):
    """With 2 learner ranks (FSDP2 or ZeRO-3), each rank's drafter replica keeps the states of its own share of the rollouts (the
    states one rank computes), both get the whole shared weights, and data-parallel training keeps the replicas
    identical; only rank 0 exports."""
    import torch.multiprocessing as mp

    from rollout.drafter.checkpoint import save_drafter
    from rollout.drafter.model import Drafter
    from tests.learner_fixtures import free_port, random_samples, save_tiny_qwen2

    model_dir = save_tiny_qwen2(tmp_path / "model")
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    init = Drafter.from_target(target, seed=0)
    drafter_dir = str(save_drafter(init, tmp_path / "drafter"))
    out = str(tmp_path / "rank%d.pt")
    mp.spawn(_drafter_rank_main, args=(2, free_port(), strategy, model_dir, drafter_dir, out), nprocs=2, join=True)
    ranks = [torch.load(out % r, weights_only=False) for r in range(2)]
    got = [{tuple(t.tolist()): h for t, h in r["buffer"]} for r in ranks]
    samples = random_samples(10, seed=4)
    assert 0 < len(got[0]) < len(samples) and len(got[0]) + len(got[1]) == len(samples)  # a share each
    assert not set(got[0]) & set(got[1])
    merged = {**got[0], **got[1]}
    with torch.no_grad():
        for s in samples:
            ids = s.prompt_token_ids + s.response_token_ids
            want = target(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            torch.testing.assert_close(merged[tuple(ids)], want, rtol=1e-4, atol=1e-5)
    for r in ranks:
        assert torch.equal(r["shared"][0], target.model.embed_tokens.weight)
        assert torch.equal(r["shared"][1], target.lm_head.weight)
        assert r["metrics"]["drafter/steps"] == 2.0 and r["metrics"]["drafter/buffer_sequences"] == len(samples)
    assert [r["share"] for r in ranks] == [2, 1]  # batch_size=3 split over 2 ranks
    clocks = ("drafter/train_s", "drafter/train_start", "drafter/train_end")  # each rank's own
    same = [{k: v for k, v in r["metrics"].items() if k not in clocks} for r in ranks]
    assert same[0] == pytest.approx(same[1]) and "drafter/loss" in same[0]
    changed = 0
    for k, v in ranks[0]["weights"].items():
        assert torch.equal(v, ranks[1]["weights"][k]), k
        changed += not torch.equal(v, init.trainable_state_dict()[k])
    assert changed > 0
    assert ranks[0]["blob"] is not None and ranks[1]["blob"] is None


def test_startup_schedule_gives_every_k_a_batch_size_at_the_top_of_the_long_tail():
    """vLLM's Model Runner V2 captures the target's verify graphs per K only up to the widest batch size that K has
    in the start-up schedule (read here off vLLM's own dense lookup): each arm must reach the top of the tail."""
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    bandit = SpecTokensBanditConfig(arms=(0, 1, 2, 3, 4), batch_size_bounds=(8, 32, 1024))
    p = SpecPolicy("adaptive", 4, long_tail_threshold=32, bandit=bandit, max_batch_size=1024)
    sched = p.startup_schedule()
    assert sched == [(1, 28, 0), (29, 29, 1), (30, 30, 2), (31, 31, 3), (32, 32, 4), (33, 1024, 0)]
    dense = build_dynamic_sd_schedule_lookup([list(r) for r in sched], vllm_max_batch_size=1024,
                                             vllm_num_speculative_tokens=4)
    widest = {}
    for batch, k in enumerate(dense[1:], start=1):
        widest[k] = batch
    assert {k: widest[k] for k in (1, 2, 3, 4)} == {1: 29, 2: 30, 3: 31, 4: 32}
    # the bandit's first choice has not been made: start-up does not consume a draw
    assert p.current == []
    # fixed mode: the long tail at K, as before
    assert SpecPolicy("fixed", 3, 16, max_batch_size=256).startup_schedule() == [(1, 16, 3), (17, 256, 0)]
    assert SpecPolicy("fixed", 2, None, max_batch_size=64).startup_schedule() == [(1, 64, 2)]
