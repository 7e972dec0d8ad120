"""Padding-free packing (trainers.packing) and the learner's kernel selection: packed log-probs and gradients
equal padded ones on tiny random Qwen2 (GQA) and Llama models, packing layout, backend choice, fallbacks."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rl.config import ConfigError, KernelsConfig, load_config
from rl.types import TrainSample
from trainers.batching import gather_response, make_micro_batches
from trainers.logprob import KernelChoice, apply_kernels, select_kernels, token_logprobs
from trainers.packing import (
    ATTENTION_BACKENDS,
    backend_unavailable,
    pack_groups,
    packed_positions,
    packing_unsupported,
    select_attention_backend,
    use_packed_attention,
)

VOCAB = 61
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one intra-op thread is faster, and immune to a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _qwen2(**kw):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def _llama():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


MODELS = {"qwen2_gqa_tied": lambda: _qwen2(tie_word_embeddings=True), "llama_untied": _llama}


def _samples(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(1, VOCAB, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(1, VOCAB, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        mask = None if i % 3 else [int(j % 2 == 0) for j in range(len(r))]
        out.append(TrainSample(p, r, [0.0] * len(r), advantage=float(i % 3) - 1.0, group_id=f"g{i}", loss_mask=mask))
    return out


def _logprobs_and_grads(model, samples, kernels, budget):
    """Per-sample response log-probs and the gradient of their masked sum."""
    model.zero_grad(set_to_none=True)
    rows = [None] * len(samples)
    for mb in make_micro_batches(samples, budget, packed=kernels.packed):
        logp, ent = token_logprobs(model, mb, 0.8, with_entropy=True, kernels=kernels)
        (logp * mb.resp_mask).sum().backward()
        assert ent.requires_grad is False
        for i, row in zip(mb.index, gather_response(mb, samples, logp.detach())):
            rows[i] = row
    return rows, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("logprob", ["naive", "chunked"])
def test_packed_equals_padded(family, logprob):
    base = MODELS[family]()
    samples = _samples()
    want, want_grads = _logprobs_and_grads(base, samples, KernelChoice(), budget=10_000)
    packed = copy.deepcopy(base)
    use_packed_attention(packed, "sdpa_segments")
    choice = KernelChoice(logprob=logprob, attention="sdpa_segments", chunk_size=5)
    for budget in (10_000, 20):  # one packed row, and several
        got, grads = _logprobs_and_grads(packed, samples, choice, budget)
        for a, b in zip(got, want):
            assert len(a) == len(b)
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
        assert grads.keys() == want_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6)


def test_packed_micro_batch_layout():
    samples = _samples(9)
    mbs = make_micro_batches(samples, token_budget=24, packed=True)
    assert sorted(i for mb in mbs for i in mb.index) == list(range(9))
    for mb in mbs:
        lengths = [samples[i].num_tokens for i in mb.index]
        assert mb.input_ids.shape == (1, sum(lengths))
        assert sum(lengths) <= 24 or len(mb.index) == 1
        assert mb.cu_seqlens.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
        assert mb.max_seqlen == max(lengths)
        assert mb.position_ids[0].tolist() == [j for n in lengths for j in range(n)]
        # No position predicts across a sequence boundary.
        for end in mb.cu_seqlens[1:-1].tolist():
            assert not mb.resp_pos[0, end - 1]
        for k, i in enumerate(mb.index):
            s0, e0 = mb.cu_seqlens[k].item(), mb.cu_seqlens[k + 1].item()
            assert (mb.seq_ids[0, s0:min(e0, mb.seq_ids.shape[1])] == k).all()
        n_resp = sum(len(samples[i].response_token_ids) for i in mb.index)
        assert int(mb.resp_pos.sum()) == n_resp
        loss_tokens = sum(sum(samples[i].loss_mask or [1] * len(samples[i].response_token_ids)) for i in mb.index)
        assert int(mb.resp_mask.sum()) == loss_tokens


def test_pack_groups():
    lengths = [5, 3, 8, 2, 7, 1, 12]
    groups = pack_groups(lengths, 10)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert groups[0] == [6]  # longer than the budget: alone
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups[1:])
    assert groups == pack_groups(lengths, 10)
    assert pack_groups([], 10) == []


def test_packed_positions():
    pos, cu = packed_positions([3, 1, 2])
    assert pos.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert cu.tolist() == [0, 3, 4, 6] and cu.dtype == torch.int32


def test_packed_attention_without_cu_seqlens_is_plain_causal():
    """A plain forward on a model switched to packed attention (e.g. a probe) still gives ordinary logits."""
    model = _qwen2()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        use_packed_attention(model, "sdpa_segments")
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backend_choice_on_cpu():
    assert ATTENTION_BACKENDS.names() == ["fa2_varlen", "sdpa_segments", "torch_varlen"]
    name, skipped = select_attention_backend(CPU, torch.float32)
    assert name == "sdpa_segments" and len(skipped) == 2
    assert "needs CUDA" in backend_unavailable("torch_varlen", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown packed attention backend"):
        backend_unavailable("flash", CPU, torch.float32)


def test_sliding_window_models_are_not_packed():
    model = _qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding_attention" in packing_unsupported(model)
    choice = select_kernels(KernelsConfig(attention="packed"), model, CPU, 4096)
    assert choice.attention == "padded" and "attention packed -> padded" in choice.describe()


def test_kernel_selection_on_cpu():
    model = _qwen2()
    auto = select_kernels(KernelsConfig(), model, CPU, 4096)
    assert (auto.logprob, auto.attention) == ("naive", "padded")  # 1 MiB of logits: not worth chunking
    big = select_kernels(KernelsConfig(), model, CPU, 2_000_000)
    assert big.logprob == "chunked"
    explicit = select_kernels(KernelsConfig(logprob="chunked", attention="packed", logprob_chunk_size=64), model, CPU, 4096)
    assert (explicit.logprob, explicit.attention, explicit.chunk_size) == ("chunked", "sdpa_segments", 64)
    with pytest.raises(ValueError, match=r"learner.kernels.logprob='triton' cannot run here: triton needs CUDA"):
        select_kernels(KernelsConfig(logprob="triton"), model, CPU, 4096)


@pytest.mark.parametrize("change", ["softcap", "bias"])
def test_heads_the_fused_kernel_cannot_reproduce_fall_back(change):
    model = _qwen2(tie_word_embeddings=False)
    if change == "softcap":
        model.config.final_logit_softcapping = 30.0
    else:
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    choice = select_kernels(KernelsConfig(logprob="chunked"), model, CPU, 4096)
    assert choice.logprob == "naive"
    assert ("soft-caps" if change == "softcap" else "bias") in choice.describe()


def test_self_check_catches_an_undeclared_logit_transform():
    """A head that rescales its logits without saying so in the config: the start-up probe falls back."""
    model = _qwen2(tie_word_embeddings=False)
    model.lm_head.register_forward_hook(lambda mod, inp, out: out * 2.0)
    chosen = select_kernels(KernelsConfig(logprob="chunked", attention="packed"), model, CPU, 4096)
    assert (chosen.logprob, chosen.attention) == ("chunked", "sdpa_segments")
    applied = apply_kernels(model, chosen, CPU)
    assert (applied.logprob, applied.attention) == ("naive", "padded")
    assert "self-check" in applied.describe()
    assert model.config._attn_implementation == "sdpa"  # the model's own attention is restored


def test_config_section_and_errors():
    cfg = load_config(overrides=["learner.kernels.logprob=chunked", "learner.kernels.attention=packed",
                                 "learner.kernels.logprob_chunk_size=256"])
    assert cfg.learner.kernels.model_dump() == {"logprob": "chunked", "attention": "packed", "logprob_chunk_size": 256}
    with pytest.raises(ConfigError, match=r"learner.kernels.logprob.*'auto', 'naive', 'chunked' or 'triton'"):
        load_config(overrides=["learner.kernels.logprob=fused"])
    with pytest.raises(ConfigError, match=r"did you mean 'learner.kernels.attention'"):
        load_config(overrides=["learner.kernels.atention=packed"])


def test_fp32_master_weights_computing_in_bf16_get_the_half_precision_attention():
    """Mixed precision keeps fp32 parameters and computes in bf16: the attention backend is picked for the compute
    dtype (the varlen kernels need fp16/bf16), not the parameters' (which left CUDA on per-sequence SDPA)."""
    model = _qwen2()
    assert next(model.parameters()).dtype == torch.float32
    cuda = torch.device("cuda")
    kernels = KernelsConfig(logprob="chunked", attention="packed")
    assert select_kernels(kernels, model, cuda, 4096).attention == "sdpa_segments"
    mixed = select_kernels(kernels, model, cuda, 4096, compute_dtype=torch.bfloat16)
    assert mixed.attention == "torch_varlen"
