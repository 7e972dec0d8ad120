"""The embedded tiny model: builds in a few steps, saves and reloads with transformers, vLLM-compatible shape."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rl.data.arith import make_arith_problems, reference_solution  # noqa: E402
from trainers.tiny_model import EOS_TOKEN, PAD_TOKEN, build_tiny_model, encode_demonstration  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_model")
    metrics = build_tiny_model(out, seed=0, sft_steps=3, sft_examples=64, sft_batch_size=8, sft_target_accuracy=None,
                               eval_problems=4, eval_samples=2)
    return out, metrics


@pytest.mark.slow  # builds and warm-starts a model
def test_build_returns_metrics_and_writes_files(tiny_dir):
    out, metrics = tiny_dir
    for key in ("build/time_s", "sft/loss_first", "sft/loss_last", "eval/acc_sampled", "eval/acc_greedy"):
        assert key in metrics
    assert metrics["sft/loss_first"] > 0
    assert 0.0 <= metrics["eval/acc_sampled"] <= 1.0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "tiny_model_build.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "tiny_model_build.json").read_text())["sft/steps"] == 3


def test_reloads_with_transformers_and_has_vllm_shape(tiny_dir):
    out, _ = tiny_dir
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert cfg.head_dim == 64 and cfg.hidden_size == cfg.num_attention_heads * 64
    assert model.dtype == torch.float32
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert cfg.eos_token_id == tok.eos_token_id != cfg.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert cfg.vocab_size == len(tok)
    ids = torch.tensor([tok("Problem: Compute 1 + 2.\nSolution:\n")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_tokenizer_round_trips_task_text_and_adds_nothing(tiny_dir):
    out, _ = tiny_dir
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for item in make_arith_problems(20, 1, "test", "hard"):
        for text in (item.prompt, reference_solution(item), "any text: é ∑ {}\\ \n"):
            ids = tok(text)["input_ids"]
            assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
            assert tok.decode(ids) == text
    # digits are single tokens, so every number is spelled digit by digit
    assert tok.convert_ids_to_tokens(tok("4075")["input_ids"]) == ["4", "0", "7", "5"]


def test_loaded_tokenizer_matches_the_trained_one(tiny_dir):
    # AutoTokenizer (and vLLM) load a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which rebuilds the
    # normalizer and pre-tokenizer: the ones saved in tokenizer.json must be the same, or engine and learner differ.
    from tokenizers import Tokenizer

    out, _ = tiny_dir
    auto = transformers.AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = ["Problem: Compute 47 + 38.\nSolution:\n", "85 \\boxed{85}", "I'm   here:\n\n x=3.14, y's", "Café ½ \\frac{1}{2}"]
    for text in texts:
        assert auto(text)["input_ids"] == raw.encode(text, add_special_tokens=False).ids


def test_demonstration_masks_prompt_and_ends_with_eos(tiny_dir):
    out, _ = tiny_dir
    tok = transformers.AutoTokenizer.from_pretrained(out)
    item = make_arith_problems(1, 0, "train")[0]
    ids, labels = encode_demonstration(tok, item.prompt, reference_solution(item))
    n_prompt = len(tok(item.prompt)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == reference_solution(item)


@pytest.mark.slow  # builds and warm-starts a model
def test_build_is_deterministic(tiny_dir, tmp_path):
    out, metrics = tiny_dir
    again = build_tiny_model(tmp_path, seed=0, sft_steps=3, sft_examples=64, sft_batch_size=8,
                             sft_target_accuracy=None, eval_problems=0)
    assert again["sft/loss_last"] == metrics["sft/loss_last"]
    assert (tmp_path / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.slow  # builds and warm-starts a model
def test_warm_start_stops_at_target_accuracy(tmp_path):
    # accuracy >= 0.0 holds at the first check (every 10 steps), so 10 of the allowed 12 steps run
    metrics = build_tiny_model(tmp_path, seed=0, sft_steps=12, sft_examples=64, sft_batch_size=4,
                               sft_target_accuracy=0.0, eval_problems=0)
    assert metrics["sft/steps"] == 10
    assert metrics["sft/val_acc_greedy"] is not None
