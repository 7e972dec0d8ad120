"""The embedded tiny model: a byte-level BPE tokenizer and a small Qwen2-shaped model, warm-started on arithmetic.

``build_tiny_model(out_dir)`` makes a checkpoint that transformers and vLLM (CPU build) both load, with no hub:

1. trains a byte-level BPE tokenizer (digits always split one per token) on task text, with ``<|endoftext|>``
   (EOS, also BOS id; never added to prompts) and ``<|pad|>``;
2. builds a random-init Qwen2 model (head dim 64: the smallest that vLLM's CPU attention supports);
3. supervised warm start on train-split demonstrations (``rl.data.arith.reference_solution`` + EOS), loss on
   response tokens only, stopped once greedy accuracy on held-back train problems reaches 35% (a few hundred
   steps): sampled answers (T=1) are then right about 20% of the time, greedy ones about 40%, which leaves RL
   room to improve and gives groups of 8 samples mixed rewards;
4. saves model (safetensors), tokenizer and ``generation_config.json`` with ``save_pretrained``.

Deterministic given the seed (on one machine and thread count). ``python -m trainers.tiny_model OUT_DIR`` prints
the metrics, including held-out accuracy of sampled and greedy answers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from rl.data.arith import DIFFICULTIES, is_correct, make_arith_problems, reference_solution
from rl.types import PromptItem

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# Defaults measured on 2 CPU cores (RL side: scripts/grpo_probe.py). The warm start stops at the target accuracy;
# the step count bounds it and sets the length of the learning-rate schedule. Where the transition to the target
# falls depends on the CPU's float kernels: with a 500-step schedule, seed 0 reached the target at step 330 with
# AVX2 kernels and never with AVX-512 ones (0.125 after 500 steps); with 1500 it reaches it with both (AVX-512:
# step 450, 60 s; AVX2: step 820, 122 s).
DEFAULT_DIFFICULTY = "easy"
DEFAULT_SFT_MAX_STEPS = 1500
DEFAULT_SFT_TARGET_ACCURACY = 0.35
DEFAULT_SFT_EXAMPLES = 6000
DEFAULT_SFT_BATCH_SIZE = 64
DEFAULT_SFT_LR = 3e-3
_SFT_VALIDATION_PROBLEMS = 200


def build_tokenizer(texts: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``: any text round-trips; digits stay one token each.

    The normalizer and pre-tokenizer are exactly Qwen2's: ``AutoTokenizer`` and vLLM load a ``qwen2`` checkpoint's
    tokenizer as ``Qwen2Tokenizer``, which rebuilds them from its own defaults, so any other choice here would make
    the engine tokenize differently from the learner. ``vocab_size`` counts the 256 byte symbols and the two
    special tokens; the rest are merges (task words), as many as the texts offer.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


# Qwen2.5-1.5B's shape (random weights stand in for it in benchmarks)
QWEN25_1_5B_SHAPE = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True, use_sliding_window=False)


def build_random_model(out_dir: str | Path, shape: dict, dtype: str = "float32", seed: int = 0) -> int:
    """A random-init Qwen2 model of ``shape`` (``Qwen2Config`` fields) with the arithmetic task's tokenizer, saved
    in ``dtype`` into ``out_dir`` so that an engine can serve it; returns its parameter count. The embedding keeps
    ``shape``'s vocabulary size (at least the tokenizer's), so the LM head costs what it costs in the real model."""
    corpus = [text for it in make_arith_problems(500, seed, "train") for text in (it.prompt, reference_solution(it))]
    tokenizer = build_tokenizer(corpus)
    if len(tokenizer) > shape["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size={shape['vocab_size']}")
    torch.manual_seed(seed)
    config = Qwen2Config(**{"use_sliding_window": False, **shape}, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def tiny_qwen2_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    intermediate_size: int = 512,
) -> Qwen2Config:
    """Qwen2 shape with 2 heads of dim 64 (vLLM CPU attention needs 64), tied embeddings, float32."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def encode_demonstration(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one demonstration: prompt and response encoded separately, as an engine sees them
    (it encodes the prompt alone and samples the response), EOS appended; labels are -100 on the prompt."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + r, [-100] * len(p) + r


def _pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _lr_scale(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine from 1 to 0.1 at ``total_steps`` (steps count from 1)."""
    if step <= warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def supervised_warm_start(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    items: list[PromptItem],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup_steps: int = 30,
    validation: list[PromptItem] | None = None,
    target_accuracy: float | None = None,
    check_every: int = 10,
    rows: list[tuple[list[int], list[int]]] | None = None,
    validate: Callable[[Qwen2ForCausalLM], float] | None = None,
) -> tuple[list[float], list[tuple[int, float]]]:
    """AdamW on response tokens: linear warm-up over ``warmup_steps``, then cosine decay to 10% of ``lr`` at ``steps``.

    Batches walk a seeded shuffle of ``items`` (reshuffled each epoch). With ``target_accuracy``, greedy accuracy
    on ``validation`` is checked every ``check_every`` steps and training stops once it reaches the target:
    the model learns this task in a sharp transition (during the decay) whose step varies with the seed, so a
    fixed step count lands anywhere from 5% to 70%; stopping on accuracy lands in a band. The schedule still
    spans ``steps``, the upper bound.

    ``rows`` replaces the default demonstrations (``(input_ids, labels)`` pairs, labels -100 where no loss) and
    ``validate(model) -> accuracy`` the default greedy check on ``validation`` (other tasks: ``trainers.tiny_dccot``).

    Returns (per-step losses, [(step, validation greedy accuracy)] of the checks).
    """
    if target_accuracy is not None and not validation and validate is None:
        raise ValueError("target_accuracy needs validation problems")
    if rows is None:
        rows = [encode_demonstration(tokenizer, it.prompt, reference_solution(it)) for it in items]
    rng = random.Random(seed)
    order: list[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    losses: list[float] = []
    checks: list[tuple[int, float]] = []
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * _lr_scale(step, warmup_steps, steps)
        if len(order) < batch_size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order += epoch
        batch = _pad_batch([rows[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        model.train()
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if target_accuracy is not None and step % check_every == 0:
            model.eval()
            acc = (validate(model) if validate is not None
                   else heldout_accuracy(model, tokenizer, validation, temperature=0.0))
            checks.append((step, acc))
            if acc >= target_accuracy:
                break
    model.eval()
    return losses, checks


@torch.no_grad()
def sample_responses(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    batch_size: int = 256,
) -> list[list[list[int]]]:
    """Response token ids ``[len(prompts)][num_samples][R]`` (EOS kept, padding dropped) from ``generate``.

    ``temperature == 0`` is greedy; otherwise pure sampling (``top_p=1``, ``top_k=0``), as the RL rollouts do.
    """
    flat = [p for p in prompts for _ in range(num_samples)]
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0
                else {"do_sample": False})
    out: list[list[int]] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generate continues after the last column
    try:
        for start in range(0, len(flat), batch_size):
            enc = tokenizer(flat[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, **sampling,
            )
            for row in gen[:, enc["input_ids"].shape[1] :].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                out.append([t for t in row if t != tokenizer.pad_token_id])
    finally:
        tokenizer.padding_side = side
    return [out[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def heldout_accuracy(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    items: list[PromptItem],
    *,
    temperature: float,
    num_samples: int = 1,
    max_new_tokens: int = 24,
) -> float:
    """Mean exact-match accuracy of the last ``\\boxed{}`` over ``items`` x ``num_samples`` responses."""
    responses = sample_responses(model, tokenizer, [it.prompt for it in items], num_samples=num_samples,
                                 temperature=temperature, max_new_tokens=max_new_tokens)
    hits = [is_correct(tokenizer.decode(r, skip_special_tokens=True), it.answer)
            for it, group in zip(items, responses) for r in group]
    return sum(hits) / max(1, len(hits))


def warm_start_metrics(model, tokenizer, losses: list[float], checks: list[tuple[int, float]]) -> dict[str, Any]:
    """``sft/*`` and ``model/*`` metrics of a finished warm start (``supervised_warm_start``'s outputs)."""
    return {
        "sft/steps": len(losses),
        "sft/val_acc_greedy": checks[-1][1] if checks else None,
        "sft/loss_first": losses[0] if losses else float("nan"),
        "sft/loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan"),
        "model/num_params": sum(p.numel() for p in model.parameters()),
        "model/vocab_size": len(tokenizer),
    }


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    difficulty: str = DEFAULT_DIFFICULTY,
    sft_steps: int = DEFAULT_SFT_MAX_STEPS,
    sft_examples: int = DEFAULT_SFT_EXAMPLES,
    sft_batch_size: int = DEFAULT_SFT_BATCH_SIZE,
    sft_lr: float = DEFAULT_SFT_LR,
    sft_target_accuracy: float | None = DEFAULT_SFT_TARGET_ACCURACY,
    num_layers: int = 4,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    eval_problems: int = 200,
    eval_samples: int = 4,
) -> dict[str, Any]:
    """Build, warm-start and save the tiny model into ``out_dir``; return its metrics.

    The warm start runs at most ``sft_steps`` steps and stops early once greedy accuracy on 200 held-back
    train-split problems (not in the SFT list, though a commuted twin may be) reaches ``sft_target_accuracy`` (None: exactly ``sft_steps``).

    Metrics: ``build/time_s``, ``sft/steps`` (steps run), ``sft/val_acc_greedy`` (last check),
    ``sft/loss_first``, ``sft/loss_last`` (mean of the last 10 steps), ``model/num_params``, ``model/vocab_size``
    and, when ``eval_problems > 0``, held-out accuracy on that many test-split problems: ``eval/acc_sampled``
    (``eval_samples`` samples each at T=1, top_p=1) and ``eval/acc_greedy``. Also written to
    ``out_dir/tiny_model_build.json``.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}: valid are {sorted(DIFFICULTIES)}")
    if hidden_size % 64:
        raise ValueError(f"hidden_size must be a multiple of 64 (head dim 64), got {hidden_size}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    # The tokenizer sees every difficulty, so one vocabulary serves all of them.
    corpus = [text for d in sorted(DIFFICULTIES) for it in make_arith_problems(500, seed, "train", d)
              for text in (it.prompt, reference_solution(it))]
    tokenizer = build_tokenizer(corpus)
    model = Qwen2ForCausalLM(tiny_qwen2_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers,
                                               intermediate_size=intermediate_size))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )

    # The list's tail is distinct from its head while the split has room: hold it back for the stopping rule.
    problems = make_arith_problems(sft_examples + _SFT_VALIDATION_PROBLEMS, seed, "train", difficulty)
    train, validation = problems[:sft_examples], problems[sft_examples:]
    losses, checks = supervised_warm_start(
        model, tokenizer, train, steps=sft_steps, batch_size=sft_batch_size, lr=sft_lr, seed=seed,
        validation=validation, target_accuracy=sft_target_accuracy,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics: dict[str, Any] = {
        "build/time_s": 0.0,
        "task/difficulty": difficulty,
        "seed": seed,
        **warm_start_metrics(model, tokenizer, losses, checks),
    }
    metrics["build/time_s"] = time.perf_counter() - t0
    if eval_problems > 0:
        t1 = time.perf_counter()
        test = make_arith_problems(eval_problems, seed, "test", difficulty)
        torch.manual_seed(seed)
        metrics["eval/acc_sampled"] = heldout_accuracy(model, tokenizer, test, temperature=1.0, num_samples=eval_samples)
        metrics["eval/acc_greedy"] = heldout_accuracy(model, tokenizer, test, temperature=0.0)
        metrics["eval/time_s"] = time.perf_counter() - t1
    (out / "tiny_model_build.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded tiny arithmetic model.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default=DEFAULT_DIFFICULTY, choices=sorted(DIFFICULTIES))
    parser.add_argument("--sft-steps", type=int, default=DEFAULT_SFT_MAX_STEPS, help="upper bound on SFT steps")
    parser.add_argument("--sft-target-accuracy", type=float, default=DEFAULT_SFT_TARGET_ACCURACY,
                        help="stop SFT at this greedy accuracy on held-back train problems (<0: run all steps)")
    parser.add_argument("--sft-examples", type=int, default=DEFAULT_SFT_EXAMPLES)
    parser.add_argument("--sft-batch-size", type=int, default=DEFAULT_SFT_BATCH_SIZE)
    parser.add_argument("--sft-lr", type=float, default=DEFAULT_SFT_LR)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = build_tiny_model(
        args.out_dir, seed=args.seed, difficulty=args.difficulty, sft_steps=args.sft_steps,
        sft_examples=args.sft_examples, sft_batch_size=args.sft_batch_size, sft_lr=args.sft_lr,
        sft_target_accuracy=None if args.sft_target_accuracy < 0 else args.sft_target_accuracy,
        num_layers=args.num_layers, eval_problems=args.eval_problems,
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
