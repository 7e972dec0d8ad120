"""LoRA building blocks (trainers/lora.py) on a tiny Qwen2 model: the adapter trains alone, the merged weights
give the adapted model's logits, and the adapter files load back."""

from __future__ import annotations

import re

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


def test_adapter_names_are_peft_s_own(tiny):
    from peft import get_peft_model_state_dict

    from trainers.lora import adapter_keys, adapter_state_dict, saved_name

    model = apply_lora(tiny, rank=4, alpha=8)
    _perturb(model)
    want = get_peft_model_state_dict(model)
    ours = adapter_state_dict(model)
    assert set(ours) == set(want) and len(ours) == 28
    assert all(torch.equal(ours[k], want[k]) for k in want)
    # and back: peft's name -> the base model's state-dict name, from the names alone
    keys = adapter_keys(model)
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"] == \
        "model.layers.1.mlp.down_proj.lora_B.default.weight"
    assert all(saved_name(v) == k for k, v in keys.items()) and set(keys) == set(want)
    with pytest.raises(ValueError, match="is not a tensor of adapter 'default'"):
        saved_name("model.layers.0.self_attn.q_proj.base_layer.weight")


def test_bad_rank():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(None, rank=0, alpha=1)


# ---------------------------------------------------------------- model.lora in the config and the learner
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# 2*r*(in+out) summed over the targets of one layer of the fixture (hidden 32, 4 heads of 8, 2 KV heads,
# intermediate 64): q 32->32, k 32->16, v 32->16, o 32->32, gate 32->64, up 32->64, down 64->32
PER_LAYER_IN_PLUS_OUT = 64 + 48 + 48 + 64 + 96 + 96 + 96


@pytest.fixture
def tiny_dir(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def _learner(path, lora=LORA, **over):
    from rl.algorithms import AlgorithmConfig
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    cfg = LearnerSettings(lr=1e-2, micro_batch_tokens=256, lora=lora, **over)
    return Learner(path, cfg, AlgorithmConfig(policy_loss="ppo_clip"), temperature=1.0, seed=0)


def _samples():
    from rl.types import TrainSample

    return [TrainSample([1, 5, 9], [13, 2, 7, 3], [-1.0] * 4, 1.0 if i % 2 else -1.0, f"p{i}") for i in range(4)]


def test_learner_trains_the_adapter_alone(tiny_dir):
    learner = _learner(tiny_dir)
    counts = learner.trainable_parameters()
    assert all(".lora_A." in n or ".lora_B." in n for n in counts) and len(counts) == 2 * 7 * 2
    # the hand count: r * (in + out) per target module and layer
    assert sum(counts.values()) == 2 * 4 * PER_LAYER_IN_PLUS_OUT == 4096
    held = [p for group in learner.optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in held) == 4096 and all(p.requires_grad for p in held)
    base = {n: p.detach().clone() for n, p in learner.model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    out = learner.train_step(_samples())
    assert out["loss/grad_norm"] > 0
    after = dict(learner.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in base.items())  # frozen base, bit for bit
    moved = [n for n, t in adapter.items() if not torch.equal(after[n], t)]
    assert any(".lora_B." in n for n in moved)
    # AdamW state exists for the adapter alone
    assert {id(p) for p in learner.optimizer.state} <= {id(p) for p in held} and len(learner.optimizer.state) == 28


def test_learner_lora_checkpoint_resumes_and_holds_merged_and_adapter(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    learner = _learner(tiny_dir)
    learner.train_step(_samples())
    learner.save(str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt" / "adapter").iterdir()) == ["adapter_config.json",
                                                                                  "adapter_model.safetensors"]
    saved = load_file(str(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == 4096
    probe = [([1, 5, 9], [13, 2, 7, 3])]
    want = learner.probe_logprobs(probe)
    # model/ is the merged model: a plain transformers load gives the adapted policy's log-probs
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(merged(torch.tensor([[1, 5, 9, 13, 2, 7, 3]])).logits[0], -1)
    got = [lp[i - 1, t].item() for i, t in zip(range(3, 7), [13, 2, 7, 3])]
    assert max(abs(a - b) for a, b in zip(want[0], got)) < 1e-5
    # resume: a fresh learner loads the adapter and the optimizer, and the next update is the same update
    again = _learner(tiny_dir)
    assert max(abs(a - b) for a, b in zip(again.probe_logprobs(probe)[0], want[0])) > 1e-4  # not loaded yet
    again.load(str(tmp_path / "ckpt"))
    assert again.num_updates == 1 and again.probe_logprobs(probe) == want
    learner.train_step(_samples())
    again.train_step(_samples())
    a, b = dict(learner.model.named_parameters()), dict(again.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in learner.trainable_parameters())
    # a full fine-tuning learner refuses a LoRA checkpoint (its model/ is a merged start, not a resume)
    with pytest.raises(RuntimeError, match="written by a model.lora run"):
        _learner(tiny_dir, lora=None).load(str(tmp_path / "ckpt"))


def test_export_adapter_in_the_engine_dtype(tiny_dir):
    from safetensors.torch import load

    files = _learner(tiny_dir, lora=LORA).export_adapter()
    tensors = load(files["adapter_model.safetensors"])
    assert len(tensors) == 28 and all(t.dtype == torch.float32 for t in tensors.values())
    assert _learner(tiny_dir, lora=None).export_adapter() is None


@pytest.mark.parametrize("override, message", [
    ("model.lora={rank: 0, alpha: 8}", "model.lora.rank: Input should be greater than or equal to 1"),
    ("model.lora={rank: 8}", "model.lora.alpha: Field required"),
    ("model.lora={rank: 8, alpha: 16, targets: [q_proj]}", "unknown config key 'model.lora.targets'; did you mean "
     "'model.lora.target_modules'?"),
    ("model.lora={rank: 8, alpha: 16, target_modules: []}", "model.lora.target_modules is empty"),
    ("model.lora={rank: 8, alpha: 16, target_modules: [q_proj, lm_head]}", "model.lora.target_modules: ['lm_head']"),
    ("model.lora={rank: 8, alpha: 16, dropout: 1.0}", "model.lora.dropout: Input should be less than 1"),
])
def test_lora_config_errors_name_the_key(override, message):
    from rl.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.build_tiny=true", override])
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["sync.transport=gloo"], "sync.transport=gloo with model.lora"),
    (["drafter.mode=fixed"], "drafter.mode=fixed with model.lora"),
    (["placement.mode=colocated"], "placement.engine_sleep_level=2 with model.lora"),
])
def test_lora_refuses_what_it_is_not_wired_with(overrides, message):
    from rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["model.build_tiny=true", "model.lora={rank: 8, alpha: 16}", *overrides])


def test_lora_config_resolves_the_engine_rank_and_sync():
    from rl.config import load_config

    for strategy in ("fsdp2", "deepspeed"):  # the sharded learners train adapters too (test_lora_sharded.py)
        sharded = load_config(None, ["model.build_tiny=true", "model.lora={rank: 8, alpha: 16}",
                                     f"learner.strategy={strategy}", "learner.num_ranks=2"])
        assert sharded.learner.strategy == strategy and sharded.weight_transport() == "adapter"

    cfg = load_config(None, ["model.build_tiny=true", "model.lora={rank: 12, alpha: 24}"])
    assert cfg.model.lora.engine_max_rank() == 16 and cfg.weight_transport() == "adapter"
    eight = load_config(None, ["model.build_tiny=true", "model.lora={rank: 8, alpha: 16}"])
    assert eight.model.lora.engine_max_rank() == 8
    assert load_config(None, []).model.lora is None and load_config(None, []).weight_transport() == "gloo"


def test_rl_eval_reads_an_adapter_directory(tiny, tmp_path):
    from trainers.evaluation import read_adapter

    model = apply_lora(tiny, rank=12, alpha=24)
    write_adapter(adapter_files(model), tmp_path / "adapter")
    files, max_rank = read_adapter(str(tmp_path / "adapter"))
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"] and max_rank == 16
    with pytest.raises(ValueError, match="no adapter_config.json, adapter_model.safetensors there"):
        read_adapter(str(tmp_path))
