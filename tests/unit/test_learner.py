"""Learner numerics on a tiny random Qwen2 model (no engine): padding, micro-batching, the update."""

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rl.algorithms import AlgorithmConfig
from rl.types import TrainSample
from trainers.batching import make_micro_batches
from trainers.learner import Learner
from trainers.settings import LearnerSettings

LEARNER_CFG = LearnerSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1e9, micro_batch_tokens=10_000,
                              mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=0)
ALGO = AlgorithmConfig(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("learner_model")
    cfg = Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _samples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(1, 50, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(1, 50, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(TrainSample(p, r, [0.0] * len(r), advantage=float(i % 3) - 1.0, group_id=f"g{i // 3}"))
    return out


def _reference_logprobs(model, s, temperature):
    ids = torch.tensor([s.prompt_token_ids + s.response_token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0] / temperature, -1)
    p = len(s.prompt_token_ids)
    return [lp[p - 1 + j, t].item() for j, t in enumerate(s.response_token_ids)]


def test_padded_logprobs_equal_unpadded(model_dir):
    learner = Learner(model_dir, LEARNER_CFG, ALGO, temperature=0.7)
    samples = _samples()
    got = learner.compute_logprobs(samples)
    for s, row in zip(samples, got):
        ref = _reference_logprobs(learner.model, s, 0.7)
        assert len(row) == len(s.response_token_ids)
        assert max(abs(a - b) for a, b in zip(row, ref)) < 1e-5


def test_micro_batches_respect_budget_and_cover_all():
    samples = _samples(10)
    mbs = make_micro_batches(samples, token_budget=24)
    assert sorted(i for mb in mbs for i in mb.index) == list(range(10))
    for mb in mbs:
        assert mb.input_ids.numel() <= 24 or len(mb.index) == 1
        assert int(mb.resp_mask.sum()) == sum(len(samples[i].response_token_ids) for i in mb.index)


def _grads(model_dir, budget, mode="token-mean", loss="ppo_clip", kernels=None):
    # budget 1 (one sample per micro-batch) is below learner.micro_batch_tokens' minimum: set without validation
    cfg = LEARNER_CFG.replace(kernels=kernels or {}).model_copy(update={"micro_batch_tokens": budget})
    algo = AlgorithmConfig(advantage_estimator="grpo", policy_loss=loss, loss_agg_mode=mode, loss_agg_const_len=8)
    learner = Learner(model_dir, cfg, algo, temperature=1.0)
    samples = _samples(8)
    captured = {}
    orig = learner.optimizer.step

    def capture():
        captured.update({n: p.grad.clone() for n, p in learner.model.named_parameters()})
        orig()

    learner.optimizer.step = capture
    metrics = learner.train_step(samples)
    return captured, metrics


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("loss", ["ppo_clip", "gspo", "sapo"])
def test_grad_accumulation_invariance(model_dir, mode, loss):
    """One micro-batch (1x8) and many micro-batches (8x1) give the same gradient, for every aggregation and loss."""
    big, m_big = _grads(model_dir, 10_000, mode, loss)
    small, m_small = _grads(model_dir, 1, mode, loss)
    for name in big:
        torch.testing.assert_close(big[name], small[name], rtol=1e-4, atol=1e-6)
    assert math.isclose(m_big["loss/policy"], m_small["loss/policy"], rel_tol=1e-5, abs_tol=1e-7)


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread is faster, and immune to a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("logprob,attention", [("chunked", "padded"), ("naive", "packed"), ("chunked", "packed")])
@pytest.mark.parametrize("loss", ["ppo_clip", "gspo"])
def test_kernel_paths_match_padded_naive(model_dir, logprob, attention, loss):
    """Fused log-probs and packed micro-batches give the padded + naive gradient, in one micro-batch and in many
    (grad accumulation). GSPO's sequence-level ratio checks that packed tokens keep their sequence index."""
    kernels = {"logprob": logprob, "attention": attention, "logprob_chunk_size": 3}
    ref, m_ref = _grads(model_dir, 10_000, "seq-mean-token-mean", loss, {"logprob": "naive", "attention": "padded"})
    for budget in (10_000, 1):
        got, m_got = _grads(model_dir, budget, "seq-mean-token-mean", loss, kernels)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)
        for key in ("loss/policy", "loss/entropy"):
            assert math.isclose(m_got[key], m_ref[key], rel_tol=1e-5, abs_tol=1e-7), key


def test_on_policy_loss_value_and_update(model_dir):
    """On-policy (ratio 1): token-mean loss = -sum(A_i * n_i) / sum(n_i); a step changes the weights."""
    learner = Learner(model_dir, LEARNER_CFG, ALGO, temperature=1.0)
    samples = _samples(6)
    expected = -sum(s.advantage * len(s.response_token_ids) for s in samples) / sum(len(s.response_token_ids) for s in samples)
    before = learner.export_weights()
    metrics = learner.train_step(samples)
    assert metrics["loss/policy"] == pytest.approx(expected, abs=1e-6)
    assert metrics["loss/clip_frac"] == 0.0
    assert metrics["loss/entropy"] > 0
    assert learner.export_weights() != before
    # Positive-advantage responses became more likely.
    after = learner.compute_logprobs(samples)
    old = [_reference_logprobs(Learner(model_dir, LEARNER_CFG, ALGO, temperature=1.0).model, s, 1.0) for s in samples]
    up = [sum(a) - sum(o) for a, o in zip(after, old)]
    assert all(u > 0 for u, s in zip(up, samples) if s.advantage > 0)
    assert all(u < 0 for u, s in zip(up, samples) if s.advantage < 0)


def test_checkpoint_round_trip(model_dir, tmp_path):
    a = Learner(model_dir, LEARNER_CFG, ALGO, temperature=1.0)
    a.train_step(_samples(6))
    a.save(str(tmp_path / "ck"))
    b = Learner(model_dir, LEARNER_CFG, ALGO, temperature=1.0)
    b.load(str(tmp_path / "ck"))
    assert b.export_weights() == a.export_weights()
    ma, mb = a.train_step(_samples(6, seed=1)), b.train_step(_samples(6, seed=1))
    assert ma["loss/policy"] == mb["loss/policy"]
    assert b.export_weights() == a.export_weights()


def test_kl_reward_penalty_per_sample(model_dir):
    """kl_in=reward: kl_coef * sum_t k1 over loss tokens, with behaviour log-probs against the reference model."""
    algo = AlgorithmConfig(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean",
                           kl_coef=0.5, kl_in="reward", kl_estimator="k1")
    learner = Learner(model_dir, LEARNER_CFG, algo, temperature=1.0)
    samples = _samples(3)
    ref = learner.compute_logprobs(samples, model=learner.ref_model)
    for s, r in zip(samples, ref):
        s.behaviour_logprobs = [x + 0.1 for x in r]  # behaviour is 0.1 nats above the reference on every token
    samples[2].loss_mask = [0] + [1] * (len(samples[2].response_token_ids) - 1)
    got = learner.kl_reward_penalties(samples)
    want = [0.5 * 0.1 * len(s.response_token_ids) for s in samples[:2]]
    want.append(0.5 * 0.1 * (len(samples[2].response_token_ids) - 1))
    assert got == pytest.approx(want, abs=1e-6)
    # With kl_in=reward the loss has no KL term.
    assert learner.train_step(samples)["loss/kl"] == 0.0


def test_truncated_importance_weights_scale_the_token_loss(model_dir):
    """Async mode: per-token loss x min(pi_old / pi_behaviour, tis_cap). At the first mini-batch pi = pi_old, so the
    PPO term is -A per token; with weights [1, 1.5, 2 (capped from 4)] token-mean gives -(1 + 1.5 + 2) / 3 = -1.5."""
    cfg = LEARNER_CFG.replace(tis_cap=2.0)
    learner = Learner(model_dir, cfg, ALGO, temperature=1.0)
    s = TrainSample([3, 4, 5], [6, 7, 8], [0.0] * 3, advantage=1.0, group_id="g0")
    old = learner.compute_logprobs([s])[0]
    s.behaviour_logprobs = [old[0], old[1] - math.log(1.5), old[2] - math.log(4.0)]
    m = learner.train_step([s])
    assert m["loss/policy"] == pytest.approx(-1.5, abs=1e-5)
    assert m["async/tis_weight_mean"] == pytest.approx(1.5, abs=1e-5)
    assert m["async/tis_clip_frac"] == pytest.approx(1 / 3, abs=1e-6)
    plain = Learner(model_dir, LEARNER_CFG, ALGO, temperature=1.0).train_step([s])
    assert plain["loss/policy"] == pytest.approx(-1.0, abs=1e-5) and "async/tis_weight_mean" not in plain


def test_plan_weight_buckets_cuts_between_decoder_layers():
    from trainers.weight_export import plan_weight_buckets

    sizes = [("model.embed_tokens.weight", 100)]
    for i in range(3):
        sizes += [(f"model.layers.{i}.self_attn.q_proj.weight", 30), (f"model.layers.{i}.self_attn.k_proj.weight", 10),
                  (f"model.layers.{i}.mlp.up_proj.weight", 20)]  # 60 bytes per layer
    sizes += [("model.norm.weight", 5), ("lm_head.weight", 100)]
    names = [n for n, _ in sizes]
    assert plan_weight_buckets(sizes, 0) == [names]  # 0: one bucket
    plan = plan_weight_buckets(sizes, 130)
    # embedding alone (100; +60 would pass 130), layers 0-1 (120), layer 2 + norm (65; +100 would pass), head
    assert [len(b) for b in plan] == [1, 6, 4, 1]
    assert [n for b in plan for n in b] == names  # every name once, in order
    assert [len(b) for b in plan_weight_buckets(sizes, 1)] == [1, 3, 3, 3, 1, 1]  # a layer is never split
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_weight_buckets(sizes, -1)


def test_bucketed_export_equals_the_whole_export(model_dir):
    from safetensors.torch import load as st_load

    learner = Learner(model_dir, LEARNER_CFG, ALGO, temperature=1.0)
    whole = st_load(learner.export_weights())
    n = learner.begin_weight_export(1)  # every decoder layer in a bucket of its own
    buckets = [st_load(learner.next_weight_bucket(b)) for b in range(n)]
    assert n == 2 + learner.model.config.num_hidden_layers + 1  # embedding, layers, norm, head
    merged = {k: v for b in buckets for k, v in b.items()}
    assert sum(len(b) for b in buckets) == len(merged) == len(whole)
    assert all(torch.equal(merged[k], whole[k]) for k in whole)


def test_memory_released_after_the_step_and_the_export(model_dir):
    """Gradients are freed at the end of the update (not only at the next one), the caching allocator is released
    after train_step and after the export's last bucket, and the step reports its allocator peak (0 on CPU)."""
    learner = Learner(model_dir, LEARNER_CFG.replace(mini_batches_per_step=2), ALGO, temperature=1.0)
    released = []
    learner._release_cached_memory = lambda: released.append(len(released))
    seen = []
    step = learner._optimizer_step

    def optimizer_step():
        seen.append(sum(p.grad is not None for p in learner.model.parameters()))
        return step()

    learner._optimizer_step = optimizer_step
    metrics = learner.train_step(_samples(6))
    assert seen == [len(list(learner.model.parameters()))] * 2  # two mini-batches, each with every gradient
    assert all(p.grad is None for p in learner.model.parameters())
    assert metrics["perf/learner_max_reserved_gib"] == 0.0
    assert len(released) == 1
    n = learner.begin_weight_export(1)
    for b in range(n - 1):
        learner.next_weight_bucket(b)
    assert len(released) == 1  # not between buckets: the engines load them meanwhile
    learner.next_weight_bucket(n - 1)
    assert len(released) == 2
