"""The EAGLE drafter: layout against a reference Llama layer, the checkpoint format vLLM loads, the objective, the
trainer, the buffer's bounds, the K bandit and the acceptance counters (CPU, a random tiny target)."""

from __future__ import annotations

import io
import json
import math
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rollout.drafter.bandit import SpecTokensBandit, SpecTokensBanditConfig  # noqa: E402
from rollout.drafter.buffer import DrafterBuffer, DrafterSequence, collate  # noqa: E402
from rollout.drafter.capture import capture_hidden_states  # noqa: E402
from rollout.drafter.checkpoint import (  # noqa: E402
    CONFIG_FILE,
    WEIGHTS_FILE,
    expected_weight_shapes,
    hf_config_dict,
    load_drafter,
    save_drafter,
    weights_for_reload,
)
from rollout.drafter.evaluate import replay_greedy_acceptance  # noqa: E402
from rollout.drafter.metrics import SpecDecodeCounters  # noqa: E402
from rollout.drafter.model import Drafter, DrafterConfig  # noqa: E402
from rollout.drafter.train import (  # noqa: E402
    DrafterLossConfig,
    DrafterTrainer,
    DrafterTrainerConfig,
    drafter_loss,
    loss_counts,
)

VOCAB, HIDDEN = 48, 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy machine extra threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target():
    """A random Qwen2 target: 4 heads of 32 over 2 KV heads (GQA), untied head, q/k/v biases; its LM head scaled
    up so that its next-token distributions are peaked like a trained model's (the token loss then has room)."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
    )
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _sequences(target, n=6, lengths=(12, 9, 16, 7, 14, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]
    return capture_hidden_states(target, ids, batch_size=4)


def test_config_is_derived_from_the_target(target):
    cfg = DrafterConfig.from_target(target.config)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HIDDEN, 4, 2, 32)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == (256, VOCAB, 1e4, 1e-6)
    assert cfg.max_position_embeddings == 128 and cfg.num_layers == 1
    bad = transformers.Qwen2Config(hidden_act="gelu")
    with pytest.raises(ValueError, match="silu"):
        DrafterConfig.from_target(bad)


def test_layer_matches_a_reference_llama_layer_without_input_norm(target):
    """Our decoder layer == transformers' Llama layer (same weights, input norm removed as vLLM does for layer 0),
    and the forward is fc(cat(embed, hidden)) -> layer, no final norm."""
    drafter = Drafter.from_target(target, seed=1)
    llama_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(drafter.cfg).items()
                                            if k not in ("architectures", "model_type", "dtype")})
    llama_cfg._attn_implementation = "eager"
    ref = transformers.models.llama.modeling_llama.LlamaDecoderLayer(llama_cfg, 0).eval()
    ref.input_layernorm = torch.nn.Identity()
    missing, unexpected = ref.load_state_dict(
        {k.removeprefix("layers.0."): v for k, v in drafter.state_dict().items() if k.startswith("layers.0.")},
        strict=False)
    assert not missing and not unexpected
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(llama_cfg)
    ids, hidden = torch.randint(0, VOCAB, (2, 9)), torch.randn(2, 9, HIDDEN)
    pos = torch.arange(9).expand(2, 9) + 5
    with torch.no_grad():
        x = drafter.fc(torch.cat([target.get_input_embeddings()(ids), hidden], -1))
        causal = torch.full((9, 9), float("-inf")).triu(1).expand(2, 1, 9, 9)
        expected = ref(x, attention_mask=causal, position_ids=pos, position_embeddings=rope(x, pos))
        got = drafter(ids, hidden, pos)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(drafter.logits(got), target.lm_head(got))


def test_capture_returns_the_state_the_lm_head_reads(target):
    ids = [[1, 2, 3, 4, 5], [7, 8, 9]]
    seqs = capture_hidden_states(target, ids, prompt_lengths=[2, 1], batch_size=2)
    alone = capture_hidden_states(target, ids[1:])[0]
    with torch.no_grad():
        logits = target(torch.tensor([ids[0]])).logits[0]
    torch.testing.assert_close(target.lm_head(seqs[0].hidden_states), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seqs[1].hidden_states, alone.hidden_states, atol=1e-5, rtol=1e-5)  # padding-free
    assert seqs[0].loss_mask.tolist() == [False, False, True, True, True] and alone.loss_mask is None


def test_forward_backward_shapes_and_frozen_shared_weights(target):
    drafter = Drafter.from_target(target)
    batch = collate(_sequences(target))
    assert batch.input_ids.shape == (6, 16) and batch.hidden_states.shape == (6, 16, HIDDEN)
    pred = drafter(batch.input_ids[:, 1:], batch.hidden_states[:, :-1])
    assert pred.shape == (6, 15, HIDDEN) and drafter.logits(pred).shape == (6, 15, VOCAB)
    loss, metrics = drafter_loss(drafter, batch, DrafterLossConfig())
    loss.backward()
    for name, p in drafter.named_parameters():
        shared = name.startswith(("embed_tokens.", "lm_head."))
        assert p.requires_grad is not shared and (p.grad is None) is shared, name
    assert metrics["drafter/positions"] == sum(len(s) - 1 for s in _sequences(target))


def test_training_leaves_shared_weights_unchanged(target):
    drafter = Drafter.from_target(target)
    embed, head = drafter.embed_tokens.weight.clone(), drafter.lm_head.weight.clone()
    fc = drafter.fc.weight.clone()
    trainer = DrafterTrainer(drafter, DrafterTrainerConfig(lr=1e-3, weight_decay=0.1))
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(drafter.embed_tokens.weight) not in optimized and id(drafter.lm_head.weight) not in optimized
    assert optimized == {id(p) for p in drafter.trainable_parameters()}
    batch = collate(_sequences(target))
    trainer.train(lambda: batch, time_budget_s=60.0, max_steps=3)
    assert torch.equal(drafter.embed_tokens.weight, embed) and torch.equal(drafter.lm_head.weight, head)
    assert not torch.equal(drafter.fc.weight, fc)
    assert torch.equal(target.lm_head.weight, head)


def test_loss_decreases_on_a_fixed_batch(target):
    drafter = Drafter.from_target(target, seed=0)
    trainer = DrafterTrainer(drafter, DrafterTrainerConfig(lr=3e-3, loss=DrafterLossConfig(token_weight=1.0)))
    batch = collate(_sequences(target))
    before = trainer.evaluate(batch)
    trainer.train(lambda: batch, time_budget_s=60.0, max_steps=25)
    after = trainer.evaluate(batch)
    assert after["drafter/loss"] < 0.8 * before["drafter/loss"]
    assert after["drafter/feature_loss"] < 0.5 * before["drafter/feature_loss"]
    assert after["drafter/token_loss"] < 0.8 * before["drafter/token_loss"]
    assert before["drafter/top1_agreement"] < 0.2 and after["drafter/top1_agreement"] > 0.5


def test_soft_labels_from_hidden_equal_labels_from_stored_logits(target):
    drafter = Drafter.from_target(target)
    seqs = _sequences(target, n=3)
    batch = collate(seqs)
    with torch.no_grad():
        batch_logits = collate(seqs)
        batch_logits.target_logits = target.lm_head(batch.hidden_states)
        a = drafter_loss(drafter, batch, DrafterLossConfig())[1]
        b = drafter_loss(drafter, batch_logits, DrafterLossConfig())[1]
    assert a["drafter/loss"] == pytest.approx(b["drafter/loss"], rel=1e-5)


def _reference_loss(drafter, batch, cfg):
    """The objective with plain autograd over all positions at once: the [positions, vocab] logits in memory."""
    import torch.nn.functional as F

    ids, hidden = batch.input_ids, batch.hidden_states.float()
    t = ids.shape[1]
    counted = (torch.arange(t - 1)[None] + 1 < batch.lengths[:, None]) & batch.loss_mask[:, 1:]
    f, target = drafter(ids[:, 1:], hidden[:, :-1])[counted], hidden[:, 1:][counted]
    feature = F.smooth_l1_loss(f, target)
    logp = F.log_softmax(drafter.logits(f).float(), dim=-1)
    target_logits = (batch.target_logits[:, 1:][counted] if batch.target_logits is not None
                     else drafter.logits(target)).detach().float()
    if cfg.token_labels == "soft":
        token = -(F.softmax(target_logits, dim=-1) * logp).sum(-1).mean()
    else:
        labels = torch.cat([ids[:, 2:], ids.new_zeros(ids.shape[0], 1)], dim=1)[counted]
        has_next = (torch.arange(t - 1)[None] + 2 < batch.lengths[:, None])[counted]
        token = F.nll_loss(logp[has_next], labels[has_next])
    top1 = (logp.argmax(-1) == target_logits.argmax(-1)).float().mean()
    return cfg.feature_weight * feature + cfg.token_weight * token, token.item(), top1.item()


@pytest.mark.parametrize("labels,stored", [("soft", False), ("soft", True), ("sampled", False)])
def test_chunked_token_loss_equals_plain_autograd(target, labels, stored):
    """The token loss formed chunk by chunk, its gradient built in the forward (chunks of 5 positions, and all 62
    at once), gives plain autograd's loss, metrics and gradients."""
    seqs = _sequences(target)
    batch = collate(seqs)
    if stored:
        with torch.no_grad():
            batch.target_logits = target.lm_head(batch.hidden_states)
    ref = Drafter.from_target(target, seed=3)
    cfg = DrafterLossConfig(token_weight=1.0, token_labels=labels)
    ref_loss, ref_token, ref_top1 = _reference_loss(ref, batch, cfg)
    ref_loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(want) > 5
    for chunk_bytes in (0, 5 * 4 * VOCAB):
        drafter = Drafter.from_target(target, seed=3)
        loss, metrics = drafter_loss(drafter, batch, DrafterLossConfig(token_weight=1.0, token_labels=labels,
                                                                       chunk_bytes=chunk_bytes))
        loss.backward()
        assert metrics["drafter/positions"] == 62 and metrics["drafter/token_loss"] > 0
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        assert metrics["drafter/token_loss"] == pytest.approx(ref_token, rel=1e-5)
        assert metrics["drafter/top1_agreement"] == pytest.approx(ref_top1)
        got = {n: p.grad for n, p in drafter.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys()
        for n, g in want.items():
            torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6)
        assert drafter.lm_head.weight.grad is None and drafter.embed_tokens.weight.grad is None


def test_bfloat16_shared_copies_halve_their_memory_and_train_alike(target):
    """The embedding and LM head copies in the target's bfloat16: the loss stays within bf16 rounding of the fp32
    copies', the drafter's own weights stay fp32 and train, the copies stay frozen."""
    batch = collate(_sequences(target))
    cfg = DrafterTrainerConfig(lr=1e-3, loss=DrafterLossConfig(token_weight=1.0))
    full, half = Drafter.from_target(target, seed=4), Drafter.from_target(target, seed=4)
    half.set_shared_dtype(torch.bfloat16)
    assert half.lm_head.weight.dtype == half.embed_tokens.weight.dtype == torch.bfloat16
    assert half.lm_head.weight.nbytes * 2 == full.lm_head.weight.nbytes and half.fc.weight.dtype == torch.float32
    head = half.lm_head.weight.clone()
    init = {k: v.clone() for k, v in full.trainable_state_dict().items()}
    m_full = DrafterTrainer(full, cfg).train(lambda: batch, time_budget_s=60.0, max_steps=3)
    m_half = DrafterTrainer(half, cfg).train(lambda: batch, time_budget_s=60.0, max_steps=3)
    assert m_half["drafter/loss"] == pytest.approx(m_full["drafter/loss"], rel=2e-2)
    assert m_half["drafter/loss_last"] < m_half["drafter/loss"]  # the mean of the 3 steps: it trains
    assert torch.equal(half.lm_head.weight, head)
    for (name, a), b in zip(full.trainable_state_dict().items(), half.trainable_state_dict().values()):
        assert b.dtype == torch.float32, name
        moved = (a - init[name]).norm()
        assert moved > 0 and (b - a).norm() < 0.1 * moved, name  # the same updates, up to bf16 rounding


def test_token_loss_by_hand_on_one_position(target):
    """One counted position: the soft loss is the cross-entropy to softmax(lm_head(h[1])), the sampled loss the
    NLL of x[2], the feature loss smooth L1 to h[1]."""
    drafter = Drafter.from_target(target)
    seq = _sequences(target, n=1, lengths=(3,))[0]
    seq.loss_mask = torch.tensor([False, True, False])
    batch = collate([seq])
    with torch.no_grad():
        f = drafter(seq.token_ids[None, 1:2], seq.hidden_states[None, :1])[0, 0]
        logp = torch.log_softmax(target.lm_head(f), -1)
        p = torch.softmax(target.lm_head(seq.hidden_states[1]), -1)
        d = (f - seq.hidden_states[1]).abs()
        feature = torch.where(d < 1.0, 0.5 * d**2, d - 0.5).mean()
        soft = drafter_loss(drafter, batch, DrafterLossConfig(feature_weight=1.0, token_weight=0.25))[1]
        hard = drafter_loss(drafter, batch, DrafterLossConfig(token_labels="sampled"))[1]
    assert soft["drafter/positions"] == 1
    assert soft["drafter/token_loss"] == pytest.approx(-(p * logp).sum().item(), rel=1e-5)
    assert soft["drafter/feature_loss"] == pytest.approx(feature.item(), rel=1e-5)
    assert soft["drafter/loss"] == pytest.approx(feature.item() - 0.25 * (p * logp).sum().item(), rel=1e-5)
    assert hard["drafter/token_loss"] == pytest.approx(-logp[seq.token_ids[2]].item(), rel=1e-5)


def test_padding_does_not_change_the_loss(target):
    drafter = Drafter.from_target(target)
    seqs = _sequences(target, n=2, lengths=(5, 11))
    with torch.no_grad():
        alone = drafter_loss(drafter, collate(seqs[:1]), DrafterLossConfig())[1]
        padded = collate(seqs)
        padded.loss_mask[1] = False  # only the short row counts; its right padding must not matter
        padded.hidden_states[0, 5:] = 123.0
        together = drafter_loss(drafter, padded, DrafterLossConfig())[1]
    assert together["drafter/loss"] == pytest.approx(alone["drafter/loss"], rel=1e-5)


@pytest.mark.parametrize("labels", ["soft", "sampled"])
def test_shares_of_a_split_batch_add_up_to_the_whole_batch(target, labels):
    """Data-parallel arithmetic: with the whole batch's counts as denominators, the two halves' losses, metrics
    and gradients add up to the whole batch's."""
    cfg = DrafterLossConfig(token_weight=0.5, token_labels=labels)
    seqs = _sequences(target)
    drafter = Drafter.from_target(target, seed=1)
    whole, halves = collate(seqs), [collate(seqs[:2]), collate(seqs[2:])]
    counts = [loss_counts(b, cfg) for b in halves]
    totals = (counts[0][0] + counts[1][0], counts[0][1] + counts[1][1])
    assert totals == loss_counts(whole, cfg) and loss_counts(None, cfg) == (0, 0)
    assert totals[0] == sum(len(s) - 1 for s in seqs)
    assert totals[1] == (totals[0] if labels == "soft" else sum(len(s) - 2 for s in seqs))

    def run(batch, tot):
        drafter.zero_grad(set_to_none=True)
        loss, metrics = drafter_loss(drafter, batch, cfg, totals=tot)
        loss.backward()
        return metrics, {n: p.grad.clone() for n, p in drafter.named_parameters() if p.grad is not None}

    m_whole, g_whole = run(whole, None)
    (m_a, g_a), (m_b, g_b) = run(halves[0], totals), run(halves[1], totals)
    for k in ("drafter/loss", "drafter/feature_loss", "drafter/token_loss", "drafter/top1_agreement",
              "drafter/positions"):
        assert m_a[k] + m_b[k] == pytest.approx(m_whole[k], rel=1e-5), k
    assert m_a["drafter/loss"] < 0.9 * m_whole["drafter/loss"]  # a share, not the half's own mean
    for n, g in g_whole.items():
        torch.testing.assert_close(g_a[n] + g_b[n], g, rtol=1e-4, atol=1e-7)


def _data_parallel_rank(rank, world, port, target_state, out_path):
    """One rank of a gloo group: a data-parallel trainer on its share (half of each fixed batch) for 3 steps."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        drafter, seqs = torch.load(target_state, weights_only=False)
        trainer = DrafterTrainer(drafter, DrafterTrainerConfig(lr=3e-3, grad_clip=0.5), data_parallel=True)
        assert trainer.data_parallel
        share = collate(seqs[:2]) if rank == 0 else collate(seqs[2:])
        m = trainer.train(lambda: share, time_budget_s=600.0, max_steps=3)
        # a rank with no data this round and a spent budget: both ranks stop together, nothing runs
        none = trainer.train(lambda: None if rank == 1 else share, time_budget_s=600.0 if rank == 0 else 0.0)
        torch.save({"metrics": m, "none": none, "weights": drafter.trainable_state_dict()}, out_path % rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_data_parallel_ranks_equal_one_rank_on_the_whole_batch(target, tmp_path):
    import torch.multiprocessing as mp

    from tests.learner_fixtures import free_port

    seqs = _sequences(target)
    init = Drafter.from_target(target, seed=2)
    torch.save((init, seqs), tmp_path / "init.pt")
    out = str(tmp_path / "rank%d.pt")
    mp.spawn(_data_parallel_rank, args=(2, free_port(), str(tmp_path / "init.pt"), out), nprocs=2, join=True)
    ranks = [torch.load(out % r) for r in range(2)]

    single, _ = torch.load(tmp_path / "init.pt", weights_only=False)
    want = DrafterTrainer(single, DrafterTrainerConfig(lr=3e-3, grad_clip=0.5))
    batch = collate(seqs)
    m = want.train(lambda: batch, time_budget_s=600.0, max_steps=3)
    for k, v in single.trainable_state_dict().items():
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), k  # the replicas stay identical
        torch.testing.assert_close(ranks[0]["weights"][k], v, rtol=1e-4, atol=2e-5)  # an AdamW step: 3e-3
        assert not torch.equal(v, init.trainable_state_dict()[k]) or k.endswith("norm.weight")
    for r in ranks:
        assert r["metrics"]["drafter/steps"] == 3.0 and r["none"]["drafter/steps"] == 0.0
        assert r["metrics"]["drafter/tokens"] == m["drafter/tokens"] == 3 * sum(len(s) for s in seqs)
        for k in ("drafter/loss", "drafter/top1_agreement", "drafter/positions", "drafter/grad_norm"):
            assert r["metrics"][k] == pytest.approx(m[k], rel=1e-4), k


def test_time_budget_and_max_steps(target):
    trainer = DrafterTrainer(Drafter.from_target(target))
    batch = collate(_sequences(target, n=2))
    assert trainer.train(lambda: batch, time_budget_s=0.0)["drafter/steps"] == 0
    m = trainer.train(lambda: batch, time_budget_s=60.0, max_steps=2)
    assert m["drafter/steps"] == 2 and trainer.num_steps == 2 and m["drafter/tokens"] == batch.num_tokens * 2
    for key in ("drafter/loss", "drafter/feature_loss", "drafter/token_loss", "drafter/top1_agreement"):
        assert math.isfinite(m[key])


def test_trainer_resumes_from_its_state_dict(target):
    batch = collate(_sequences(target, n=3))
    a = DrafterTrainer(Drafter.from_target(target, seed=0), DrafterTrainerConfig(lr=1e-3))
    a.train(lambda: batch, time_budget_s=60.0, max_steps=2)
    b = DrafterTrainer(Drafter.from_target(target, seed=5), DrafterTrainerConfig(lr=1e-3))
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    b.load_state_dict(torch.load(saved))
    assert b.num_steps == 2
    assert a.step(batch)["drafter/loss"] == b.step(batch)["drafter/loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.drafter.trainable_parameters(), b.drafter.trainable_parameters()))


def test_checkpoint_has_exactly_the_vllm_eagle_names_and_config(target, tmp_path):
    from safetensors.torch import load, load_file

    drafter = Drafter.from_target(target, seed=3)
    out = save_drafter(drafter, tmp_path / "drafter")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    tensors = load_file(str(out / WEIGHTS_FILE))
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {
        "fc.weight": (HIDDEN, 2 * HIDDEN),
        "layers.0.self_attn.q_proj.weight": (128, HIDDEN),
        "layers.0.self_attn.k_proj.weight": (64, HIDDEN),
        "layers.0.self_attn.v_proj.weight": (64, HIDDEN),
        "layers.0.self_attn.o_proj.weight": (HIDDEN, 128),
        "layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "layers.0.mlp.gate_proj.weight": (256, HIDDEN),
        "layers.0.mlp.up_proj.weight": (256, HIDDEN),
        "layers.0.mlp.down_proj.weight": (HIDDEN, 256),
    }
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (HIDDEN, 1, 4, 2, 32, 256, VOCAB)
    assert cfg["rope_parameters"]["rope_theta"] == 1e4 and cfg["rms_norm_eps"] == 1e-6
    assert not cfg["attention_bias"] and not cfg["mlp_bias"] and cfg["hidden_act"] == "silu"
    hf = transformers.AutoConfig.from_pretrained(out)  # what vLLM parses before wrapping it as EAGLE
    assert type(hf).__name__ == "LlamaConfig" and hf.rope_parameters["rope_theta"] == 1e4 and hf.head_dim == 32

    again = load_drafter(out, target)
    ids, hidden = torch.randint(0, VOCAB, (1, 6)), torch.randn(1, 6, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, hidden), drafter(ids, hidden), atol=0, rtol=0)
    assert {n: tuple(t.shape) for n, t in load(weights_for_reload(drafter)).items()} == \
        expected_weight_shapes(drafter.cfg)
    assert all(t.dtype == torch.bfloat16 for t in load(weights_for_reload(drafter, torch.bfloat16)).values())


def test_save_replaces_an_existing_checkpoint_leaving_no_temporaries(target, tmp_path):
    a, b = Drafter.from_target(target, seed=1), Drafter.from_target(target, seed=2)
    save_drafter(a, tmp_path / "d")
    save_drafter(b, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert torch.equal(load_drafter(tmp_path / "d").fc.weight, b.fc.weight)


def test_two_layer_drafter_names_follow_llama(target, tmp_path):
    from safetensors.torch import load_file

    drafter = Drafter.from_target(target, num_layers=2)
    names = set(load_file(str(save_drafter(drafter, tmp_path / "d2") / WEIGHTS_FILE)))
    assert "layers.1.input_layernorm.weight" in names and "layers.0.input_layernorm.weight" not in names
    assert names == set(expected_weight_shapes(drafter.cfg))


def _seq(n: int, tag: int) -> DrafterSequence:
    return DrafterSequence(torch.full((n,), tag), torch.full((n, 4), float(tag)))


def test_buffer_bounds_and_eviction_order():
    buf = DrafterBuffer(max_steps=2, max_tokens=100)
    buf.add_step(0, [_seq(10, 0), _seq(10, 1)])
    buf.add_step(1, [_seq(10, 2)])
    buf.add_step(2, [_seq(10, 3)])  # step bound: step 0 goes as a whole
    assert buf.steps == [1, 2] and buf.num_tokens == 20 and buf.num_evicted_sequences == 2
    buf = DrafterBuffer(max_steps=10, max_tokens=25)
    buf.add_step(0, [_seq(10, 0), _seq(10, 1)])
    buf.add_step(1, [_seq(10, 2)])  # token bound: the oldest sequence of the oldest step goes first
    assert [int(s.token_ids[0]) for s in buf.sequences()] == [1, 2] and buf.num_tokens == 20
    buf.add_step(2, [_seq(15, 3)])
    assert [int(s.token_ids[0]) for s in buf.sequences()] == [2, 3] and buf.steps == [1, 2]
    assert buf.num_tokens == 25 and buf.num_evicted_sequences == 2
    buf.add_step(3, [_seq(30, 4)])  # longer than the bound: nothing fits
    assert buf.num_sequences == 0 and buf.num_tokens == 0
    with pytest.raises(ValueError, match="increasing"):
        buf.add_step(3, [_seq(1, 5)])
    with pytest.raises(ValueError, match="empty"):
        buf.sample_batch(2, random.Random(0))


def test_buffer_samples_batches_and_stores_in_its_dtype():
    buf = DrafterBuffer(max_steps=3, max_tokens=1000, storage_dtype=torch.bfloat16)
    buf.add_step(0, [_seq(n, n) for n in (3, 5, 7, 9)])
    assert all(s.hidden_states.dtype == torch.bfloat16 for s in buf.sequences())
    batch = buf.sample_batch(3, random.Random(0))
    assert batch.input_ids.shape[0] == 3 and batch.hidden_states.dtype == torch.float32
    for row, n in enumerate(batch.lengths.tolist()):
        assert batch.loss_mask[row].sum() == n and (batch.input_ids[row, :n] == n).all()
    assert buf.sample_batch(10, random.Random(0)).input_ids.shape[0] == 4


def _play(bandit: SpecTokensBandit, rounds: int, reward_of, batch_sizes=(1,), seed=0) -> dict:
    rng = random.Random(seed)
    plays: dict = {}
    for r in range(rounds):
        bs = batch_sizes[r % len(batch_sizes)]
        k = bandit.choose(bs)
        bandit.update(bs, k, reward_of(bs, k) * (1 + 0.2 * (rng.random() - 0.5)))
        plays[(bs, k)] = plays.get((bs, k), 0) + 1
    return plays


@pytest.mark.parametrize("policy", ["epsilon_greedy", "ucb1"])
def test_bandit_finds_the_best_k_per_bucket(policy):
    # Accepted tokens/s: small batches gain from drafting (best K=2), large ones lose (best K=0).
    def reward(bs, k):
        return {0: 1000.0, 1: 1500.0, 2: 1800.0, 3: 1400.0}[k] if bs <= 4 else {0: 9000.0, 1: 7000.0, 2: 5000.0,
                                                                                 3: 4000.0}[k]

    bandit = SpecTokensBandit(SpecTokensBanditConfig(arms=(0, 1, 2, 3), batch_size_bounds=(4, 64), policy=policy,
                                                     epsilon=0.1, ucb_c=0.5, seed=1))
    plays = _play(bandit, 600, reward, batch_sizes=(2, 32))
    assert bandit.best(1) == 2 and bandit.best(50) == 0 and bandit.best(1000) == 0
    assert max((k for k in (0, 1, 2, 3)), key=lambda k: plays.get((2, k), 0)) == 2
    assert max((k for k in (0, 1, 2, 3)), key=lambda k: plays.get((32, k), 0)) == 0
    assert bandit.schedule(128) == [(1, 4, 2), (5, 128, 0)]


def test_bandit_plays_each_arm_first_and_resumes_from_state():
    cfg = SpecTokensBanditConfig(arms=(0, 2, 4), policy="epsilon_greedy", epsilon=0.5, seed=3)
    bandit = SpecTokensBandit(cfg)
    first = []
    for _ in range(3):
        first.append(bandit.choose(8))
        bandit.update(8, first[-1], 10.0 * first[-1])
    assert first == [0, 2, 4] and bandit.best(8) == 4 and bandit.best(1) == 0  # bucket of 1 has no rewards yet
    state = json.loads(json.dumps(bandit.state_dict()))
    twin = SpecTokensBandit(cfg)
    twin.load_state_dict(state)
    assert [twin.choose(8) for _ in range(20)] == [bandit.choose(8) for _ in range(20)]
    with pytest.raises(ValueError, match="arms"):
        SpecTokensBandit(SpecTokensBanditConfig(arms=(0, 1))).load_state_dict(state)
    with pytest.raises(ValueError, match="valid are"):
        SpecTokensBanditConfig(policy="thompson")
    with pytest.raises(ValueError, match="not an arm"):
        bandit.update(8, 3, 1.0)


def test_bandit_recency_weighting_follows_a_drifting_reward():
    bandit = SpecTokensBandit(SpecTokensBanditConfig(arms=(0, 1), policy="epsilon_greedy", epsilon=0.2,
                                                     step_size=0.2, seed=0))
    _play(bandit, 200, lambda bs, k: 100.0 if k == 0 else 50.0)
    _play(bandit, 200, lambda bs, k: 50.0 if k == 0 else 100.0)  # the drafter got better
    assert bandit.best(1) == 1


class _Metric:
    def __init__(self, name, value=None, values=None):
        self.name, self.value, self.values = name, value, values


def test_spec_decode_counters_and_deltas():
    def snapshot(drafts, tokens, accepted, per_pos):
        return [_Metric("vllm:spec_decode_num_drafts", drafts), _Metric("vllm:spec_decode_num_draft_tokens", tokens),
                _Metric("vllm:spec_decode_num_accepted_tokens", accepted),
                _Metric("vllm:spec_decode_num_accepted_tokens_per_pos", values=per_pos),
                _Metric("vllm:num_requests_running", 3)]

    a = SpecDecodeCounters.from_metrics(snapshot(10, 30, 12, [7, 4, 1]))
    b = SpecDecodeCounters.from_metrics(snapshot(30, 90, 52, [19, 20, 13]))
    d = b.minus(a)
    assert (d.num_drafts, d.num_draft_tokens, d.num_accepted_tokens) == (20, 60, 40)
    assert d.accepted_per_position == (12, 16, 12)
    assert d.mean_acceptance_length == pytest.approx(3.0) and a.mean_acceptance_length == pytest.approx(2.2)
    assert d.acceptance_rate == pytest.approx(40 / 60)
    assert d.acceptance_rate_per_position == pytest.approx([0.6, 0.8, 0.6])
    assert math.isnan(SpecDecodeCounters().mean_acceptance_length)
    assert d.as_metrics()["rollout/spec_decode/mean_acceptance_length"] == pytest.approx(3.0)


class _PositionalDrafter:
    """Guesses token ``x[i]`` right unless ``i`` is in ``wrong`` (reads only how long its input is)."""

    training = False

    def __init__(self, truth: list[int], wrong: set[int], vocab: int = 16):
        self.truth, self.wrong, self.vocab = truth, wrong, vocab

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, ids, hidden):
        n = ids.shape[1]  # the query at position n-1 guesses x[n+1]
        guess = self.truth[n + 1] if n + 1 < len(self.truth) else 0
        guess = (guess + 1) % self.vocab if n + 1 in self.wrong else guess
        return torch.full((1, n, 1), float(guess))

    def logits(self, f):
        return torch.nn.functional.one_hot(f.long().view(()), self.vocab).float()


def test_replay_follows_vllm_rounds_by_hand():
    truth = list(range(10))
    seq = DrafterSequence(torch.tensor(truth), torch.zeros(10, 1))
    # Prompt of 3, x[3] from the prefill. Round 1 drafts x4 x5 x6 (x6 wrong): 2 accepted, bonus x6.
    # Round 2 drafts x7 x8 x9: all accepted, and nothing is left to verify.
    c = replay_greedy_acceptance(_PositionalDrafter(truth, {6}), [seq], [3], 3)
    assert (c.num_drafts, c.num_accepted_tokens, c.accepted_per_position) == (2, 5, (2, 2, 1))
    assert c.mean_acceptance_length == pytest.approx(3.5)
    # Round 2 with x9 wrong: 2 accepted, bonus x9 ends the sequence.
    c = replay_greedy_acceptance(_PositionalDrafter(truth, {6, 9}), [seq], [3], 3)
    assert (c.num_drafts, c.num_accepted_tokens, c.accepted_per_position) == (2, 4, (2, 2, 0))
    # Generation stopped at x7 (x8, x9: the target's continuation): round 2 still drafts x7 x8 x9, and the drafts
    # past the end count when they match, as vLLM counts them.
    c = replay_greedy_acceptance(_PositionalDrafter(truth, {6}), [seq], [3], 3, sequence_ends=[8])
    assert (c.num_drafts, c.num_accepted_tokens) == (2, 5)
    # K=1, x4 wrong: rounds draft x4 (rejected; bonus x4), x5 (bonus x6), x7 (bonus x8), x9.
    c = replay_greedy_acceptance(_PositionalDrafter(truth, {4}), [seq], [3], 1)
    assert (c.num_drafts, c.num_accepted_tokens, c.accepted_per_position) == (4, 3, (3,))
