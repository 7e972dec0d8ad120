"""LoRA building blocks (trainers/lora.py) on a tiny Qwen2 model: the adapter trains alone, the merged weights
give the adapted model's logits, and the adapter files load back."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from trainers.lora import adapter_files, apply_lora, merged_state_dict, write_adapter  # noqa: E402


@pytest.fixture
def tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


def _perturb(model, std=0.1):
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)


def test_only_the_adapter_trains_and_starts_as_the_base(tiny):
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        base_logits = tiny(ids).logits.clone()
    model = apply_lora(tiny, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x 7 projections x (A + B)
    assert len(trainable) == 2 * 7 * 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)  # B = 0 at the start


def test_merged_weights_give_the_adapted_logits(tiny):
    from transformers import Qwen2ForCausalLM

    model = apply_lora(tiny, rank=4, alpha=8)
    _perturb(model)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        want = model(ids).logits
    merged = merged_state_dict(model)
    fresh = Qwen2ForCausalLM(model.get_base_model().config).eval()
    missing, unexpected = fresh.load_state_dict(merged, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied embeddings may omit the head
    with torch.no_grad():
        got = fresh(ids).logits
    assert (got - want).abs().max().item() < 1e-5
    # and the model itself is unchanged (no merge in place): its base weights still differ from the merged ones
    base_q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert (merged["model.layers.0.self_attn.q_proj.weight"] - base_q).abs().max().item() > 1e-4


def test_adapter_files_load_back_with_peft(tiny, tmp_path):
    import copy

    from peft import PeftModel

    untouched = copy.deepcopy(tiny)
    model = apply_lora(tiny, rank=4, alpha=8)
    _perturb(model)
    write_adapter(adapter_files(model), tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(untouched, tmp_path / "adapter").eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max().item() < 1e-6


def test_bad_rank():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(None, rank=0, alpha=1)
