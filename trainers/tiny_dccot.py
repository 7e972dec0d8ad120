"""The embedded DC-CoT model: the tiny Qwen2 shape, warm-started on synthetic director/worker demonstrations.

``build_tiny_dccot_model(out_dir)`` makes a checkpoint that transformers and vLLM (CPU build) both load:

1. a byte-level BPE tokenizer trained on the task's prompts and demonstrations, plus every DC-CoT tag as one
   ordinary (non-special) added token: a stop string then always ends on a token boundary, so the executor's
   token-level contexts match the text the grammar checks (with plain BPE a token like ``"><"`` can straddle
   ``<spawn_workers>`` and the next tag);
2. supervised warm start on demonstrations of ``rl.data.dccot_arith`` in both styles (concise and verbose, half
   each). Each demonstration is replayed through the real executor (``rollout.dccot.run_dccot`` with a scripted
   generate function) and turned into train samples with ``rollout.dccot.to_train_samples``: the director thread
   and one sample per worker, loss on exactly the tokens the model would sample. So the warm start teaches the
   model under the same conditioning it gets at rollout time (a worker never sees its siblings);
3. stops once the executor-run greedy accuracy on held-back train problems reaches the target, and saves.

``python -m trainers.tiny_dccot OUT_DIR`` prints the metrics, including held-out accuracy, format validity and
longest path of greedy and sampled trajectories (run through the executor with transformers' ``generate``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2ForCausalLM

from rl.data.arith import is_correct
from rl.data.dccot_arith import DCCOT_TAGS, STYLES, demonstration, make_sum_problems
from rl.dccot import SPAWN_CLOSE, SPAWN_OPEN, DCCoTConfig, response_format_valid, worker_close
from rl.types import PromptItem, Rollout
from rollout.dccot import Trajectory, TrajectoryRequest, run_dccot, to_train_samples
from trainers.tiny_model import build_tokenizer, supervised_warm_start, tiny_qwen2_config, warm_start_metrics

DEFAULT_SFT_MAX_STEPS = 600
DEFAULT_SFT_TARGET_ACCURACY = 0.5
DEFAULT_SFT_EXAMPLES = 4000
_VALIDATION_PROBLEMS = 100

TINY_DCCOT_CONFIG = DCCoTConfig(
    workers_per_block=3, max_spawn_blocks=2, max_worker_tokens=24, max_path_tokens=96, max_total_tokens=160,
)
"""Rollout shape of the tiny task: demonstrations have one block, workers ~6-12 tokens, paths ~25-45 tokens."""


def build_dccot_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """The tiny BPE tokenizer (``trainers.tiny_model.build_tokenizer``) with each DC-CoT tag as one added token."""
    tok = build_tokenizer(texts, vocab_size=360)
    tok.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in DCCOT_TAGS])
    return tok


def _encoder(tokenizer) -> tuple:
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return encode, decode


def _demo_pieces(response: str) -> tuple[str, list[str], str]:
    """(director text up to and including ``<spawn_workers>``, worker texts with their closers, final text)."""
    head, rest = response.split(SPAWN_OPEN, 1)
    block, final = rest.split(SPAWN_CLOSE, 1)
    workers = []
    for i in (1, 2, 3):
        start = block.index(f"<worker_{i}>") + len(f"<worker_{i}>")
        end = block.index(worker_close(i)) + len(worker_close(i))
        workers.append(block[start:end])
    return head + SPAWN_OPEN, workers, final


def demonstration_trajectory(item: PromptItem, style: str, tokenizer, cfg: DCCoTConfig = TINY_DCCOT_CONFIG) -> Trajectory:
    """Replay the demonstration of ``item`` through ``run_dccot``: a scripted engine answers each request with
    the demonstration's next piece (the final director piece ends in EOS)."""
    encode, decode = _encoder(tokenizer)
    director0, workers, final = _demo_pieces(demonstration(item, style))
    director_calls = 0

    def rollout(prompt: list[int], text: str, eos: bool) -> Rollout:
        ids = encode(text) + ([tokenizer.eos_token_id] if eos else [])
        return Rollout(item.id, list(prompt), ids, [0.0] * len(ids), "stop", 0, text)

    def generate_fn(prompts, seeds, max_tokens, stops):
        nonlocal director_calls
        if stops[0] == [SPAWN_OPEN]:
            director_calls += 1
            return [rollout(prompts[0], director0 if director_calls == 1 else final, eos=director_calls > 1)]
        return [rollout(p, w, eos=False) for p, w in zip(prompts, workers)]

    prompt = encode(item.prompt)
    (traj,) = run_dccot(generate_fn, encode, decode, [TrajectoryRequest(item.id, prompt, 0)], cfg)
    if traj.end_reason != "stop":
        raise ValueError(f"demonstration of {item.id} did not fit the DC-CoT config (ended by {traj.end_reason})")
    return traj


def demonstration_rows(items: list[PromptItem], tokenizer, seed: int,
                       styles: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """SFT rows ``(input_ids, labels)`` of every thread of every demonstration (labels -100 on context and
    injected tokens). The style of each item is ``styles[i]``, or drawn uniformly with ``seed``."""
    rng = random.Random(seed)
    rows = []
    for i, it in enumerate(items):
        style = styles[i] if styles is not None else STYLES[rng.randrange(len(STYLES))]
        traj = demonstration_trajectory(it, style, tokenizer)
        for s in to_train_samples([traj], [1.0]):
            labels = [t if m else -100 for t, m in zip(s.response_token_ids, s.loss_mask)]
            rows.append((s.prompt_token_ids + s.response_token_ids, [-100] * len(s.prompt_token_ids) + labels))
    return rows


def hf_generate_fn(model, tokenizer, temperature: float = 0.0):
    """A ``rollout.dccot.GenerateFn`` on transformers' ``generate``, for stop strings that are single tokens (the
    tiny DC-CoT tokenizer's tags). Greedy at ``temperature=0``; seeds are not honoured (validation only)."""
    encode, _ = _encoder(tokenizer)

    @torch.no_grad()
    def generate_fn(prompts, seeds, max_tokens, stops) -> list[Rollout]:
        out: list[Rollout | None] = [None] * len(prompts)
        by_stop: dict[tuple[str, ...], list[int]] = {}
        for k, st in enumerate(stops):
            by_stop.setdefault(tuple(st), []).append(k)
        for stop, idx in by_stop.items():
            stop_ids = [encode(s) for s in stop]
            if any(len(s) != 1 for s in stop_ids):
                raise ValueError(f"hf_generate_fn needs single-token stop strings, got {stop}")
            enders = [tokenizer.eos_token_id] + [s[0] for s in stop_ids]
            width = max(len(prompts[k]) for k in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, k in enumerate(idx):  # left padding: generate continues after the last column
                ids[row, width - len(prompts[k]):] = torch.tensor(prompts[k])
                mask[row, width - len(prompts[k]):] = 1
            sampling = ({"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0
                        else {"do_sample": False})
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(max_tokens[k] for k in idx),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=enders, **sampling)
            for row, k in enumerate(idx):
                seq = gen[row, width:].tolist()[: max_tokens[k]]
                cut = next((j + 1 for j, t in enumerate(seq) if t in enders), None)
                seq = seq[:cut] if cut is not None else seq
                text = tokenizer.decode(seq, skip_special_tokens=True)
                out[k] = Rollout(f"req-{k}", list(prompts[k]), seq, [0.0] * len(seq),
                                 "stop" if cut is not None else "length", 0, text)
        return out  # type: ignore[return-value]

    return generate_fn


def dccot_accuracy(model, tokenizer, items: list[PromptItem], *, temperature: float = 0.0,
                   cfg: DCCoTConfig = TINY_DCCOT_CONFIG) -> dict[str, float]:
    """Accuracy, format validity and mean longest path of one executor-run trajectory per item."""
    encode, decode = _encoder(tokenizer)
    reqs = [TrajectoryRequest(it.id, encode(it.prompt), k) for k, it in enumerate(items)]
    trajs = run_dccot(hf_generate_fn(model, tokenizer, temperature), encode, decode, reqs, cfg)
    n = max(len(items), 1)
    return {
        "accuracy": sum(is_correct(t.response_text, it.answer) for t, it in zip(trajs, items)) / n,
        "format_valid": sum(response_format_valid(t.response_text, cfg.workers_per_block) for t in trajs) / n,
        "longest_path_mean": sum(t.path_lengths.longest_path_tokens for t in trajs) / n,
        "total_tokens_mean": sum(t.path_lengths.total_tokens for t in trajs) / n,
    }


def build_tiny_dccot_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    sft_steps: int = DEFAULT_SFT_MAX_STEPS,
    sft_examples: int = DEFAULT_SFT_EXAMPLES,
    sft_batch_size: int = 64,
    sft_lr: float = 3e-3,
    sft_target_accuracy: float | None = DEFAULT_SFT_TARGET_ACCURACY,
    num_layers: int = 4,
    hidden_size: int = 128,
    eval_problems: int = 200,
) -> dict[str, Any]:
    """Build, warm-start and save the tiny DC-CoT model into ``out_dir``; return its metrics (also written to
    ``out_dir/tiny_model_build.json``). The warm start stops once executor-run greedy accuracy on 100 held-back
    train problems reaches ``sft_target_accuracy`` (checked every 25 steps; None: run ``sft_steps``)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    corpus_items = make_sum_problems(400, seed, "train")
    corpus = [text for it in corpus_items for text in (it.prompt, *(demonstration(it, s) for s in STYLES))]
    tokenizer = build_dccot_tokenizer(corpus)
    model = Qwen2ForCausalLM(tiny_qwen2_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    problems = make_sum_problems(sft_examples + _VALIDATION_PROBLEMS, seed, "train")
    train, validation = problems[:sft_examples], problems[sft_examples:]
    rows = demonstration_rows(train, tokenizer, seed)
    losses, checks = supervised_warm_start(
        model, tokenizer, train, steps=sft_steps, batch_size=sft_batch_size, lr=sft_lr, seed=seed,
        target_accuracy=sft_target_accuracy, check_every=25, rows=rows,
        validate=lambda m: dccot_accuracy(m, tokenizer, validation)["accuracy"],
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics: dict[str, Any] = {
        "task": "dccot_sum",
        "seed": seed,
        "sft/rows": len(rows),
        **warm_start_metrics(model, tokenizer, losses, checks),
    }
    metrics["build/time_s"] = time.perf_counter() - t0
    if eval_problems > 0:
        test = make_sum_problems(eval_problems, seed, "test")
        torch.manual_seed(seed)
        for name, temp in (("greedy", 0.0), ("sampled", 1.0)):
            for key, value in dccot_accuracy(model, tokenizer, test, temperature=temp).items():
                metrics[f"eval/{name}_{key}"] = value
    (out / "tiny_model_build.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded tiny DC-CoT model.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=DEFAULT_SFT_MAX_STEPS)
    parser.add_argument("--sft-target-accuracy", type=float, default=DEFAULT_SFT_TARGET_ACCURACY,
                        help="stop at this executor-run greedy accuracy on held-back problems (<0: run all steps)")
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = build_tiny_dccot_model(
        args.out_dir, seed=args.seed, sft_steps=args.sft_steps, eval_problems=args.eval_problems,
        sft_target_accuracy=None if args.sft_target_accuracy < 0 else args.sft_target_accuracy,
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
