"""The embedded tiny model for GiGPO: the tiny Qwen2 shape, warm-started on random valid moves of ``number_target``.

``build_tiny_number_target_model(out_dir)`` makes a checkpoint that transformers and vLLM (CPU build) both load:

1. a byte-level BPE tokenizer (``trainers.tiny_model.build_tokenizer``) trained on the environment's observations
   and action texts, plus ``+1`` and ``*2`` as ordinary added tokens (``build_number_target_tokenizer``), so
   ``"State: 3. Target: 10. Action (+1 or *2):"`` is 19 tokens (one per digit) and a move is one token;
2. supervised warm start (``trainers.tiny_model.supervised_warm_start`` with ``rows=`` and ``validate=``) on every
   state the environment can show (``reachable_states``, 189 with the defaults). The prompt is the observation
   text exactly as the ``episodes`` kind sends it to the engine (the raw observation: no chat template, no BOS);
   the responses are the state's four valid action texts and EOS (``action_texts``: ``+1``, ``*2`` and the two
   numbers they lead to), one row each, so the target distribution is uniform over the moves: the model learns
   the answer format, not the game (uniformly random moves succeed 22% of the time from the reset distribution).
   The number forms make the model read the state (to write ``4`` or ``6`` from 3 it must find the 3): trained
   on ``+1``/``*2`` alone it learns nothing about the state, and neither supervised nor RL training from there
   got it to condition on the state within a few hundred steps (RL settled on "always +1", success 0.36);
3. stops once 95% of the answers sampled at T=1 (two per state, every state) are valid actions, checked every
   25 steps, and saves. Seed 0: 350 steps, 64 s on one thread of a busy 2-core machine (final loss 0.63 per
   response token); greedy answers all valid, T=1 ones 95.9%, half of them in number form, +1 in 51% of them.
   Played on the ``episodes`` kind's 64 eval start states: greedy success 0.16, T=1 success 0.22.

``python -m trainers.tiny_number_target OUT_DIR`` prints the metrics, including the invalid-action share and the
success rate of episodes played greedily and at T=1 with transformers' ``generate`` on the eval start states.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2ForCausalLM

from rl.types import Rollout
from rollout.envs_builtin import NumberTargetEnv, min_steps_to_target
from rollout.multiturn import episode_metrics, run_episodes
from trainers.tiny_model import (
    build_tokenizer,
    encode_demonstration,
    sample_responses,
    supervised_warm_start,
    tiny_qwen2_config,
    warm_start_metrics,
)

ACTIONS = ("+1", "*2")
"""The moves in operator form; each is also demonstrated as the number it leads to (``action_texts``)."""
DEFAULT_SFT_MAX_STEPS = 400
DEFAULT_SFT_TARGET_VALID = 0.95
DEFAULT_SFT_BATCH_SIZE = 64
DEFAULT_SFT_LR = 3e-3
EVAL_SEED_BASE = 2**31
"""The ``episodes`` kind's eval start states are seeds ``2**31 + i`` (never drawn for training)."""


def reachable_states(env: NumberTargetEnv | None = None) -> list[tuple[int, int]]:
    """Every ``(current, target)`` that ``env`` can show as an observation, sorted.

    Start pairs are the support of ``env.reset``: start in [1, max_start], target in [start + 2, max_target],
    reachable in at most ``max_steps`` moves. From each, the states at most ``max_steps - 1`` moves on that are
    still below the target (reaching or passing it ends the episode; an invalid action keeps the state).
    """
    env = env or NumberTargetEnv()
    states: set[tuple[int, int]] = set()
    for start in range(1, env.max_start + 1):
        for target in range(start + 2, env.max_target + 1):
            needed = min_steps_to_target(start, target)
            if needed is None or needed > env.max_steps:
                continue
            frontier = {start}
            for _ in range(env.max_steps):
                states |= {(c, target) for c in frontier}
                frontier = {m for c in frontier for m in (c + 1, 2 * c) if m < target}
    return sorted(states)


def observation(current: int, target: int, env: NumberTargetEnv | None = None) -> str:
    """The environment's own observation text for a state (the prompt the engine gets for that turn)."""
    env = env or NumberTargetEnv()
    env.current, env.target = current, target
    return env.observation()


def action_texts(current: int) -> list[str]:
    """The valid action texts demonstrated from ``current``: ``+1``, ``*2``, then the numbers they lead to
    (``["+1", "*2", "4", "6"]`` from 3). Each move has two of the four, so a uniform draw is a uniform move."""
    return [*ACTIONS, str(current + 1), str(2 * current)]


def demonstrations(states: list[tuple[int, int]], env: NumberTargetEnv | None = None) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs: every state once with each of its ``action_texts`` (uniform over valid
    moves and their forms)."""
    env = env or NumberTargetEnv()
    return [(observation(c, t, env), a) for c, t in states for a in action_texts(c)]


def tokenizer_corpus(states: list[tuple[int, int]], env: NumberTargetEnv | None = None) -> list[str]:
    """Observations of ``states`` and the action texts, in their plain and boxed forms."""
    env = env or NumberTargetEnv()
    actions = sorted({a for c, _ in states for a in action_texts(c)})
    return [observation(c, t, env) for c, t in states] + actions + [f"\\boxed{{{a}}}" for a in actions]


def build_number_target_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """The tiny BPE tokenizer (``trainers.tiny_model.build_tokenizer``) with each action of ``ACTIONS`` as one
    ordinary added token: the Qwen2 pre-tokenizer splits ``+1`` into ``+`` and ``1``, which would make the model's
    choice of move a two-token decision; as one token it is one softmax (the response is the action and EOS)."""
    tok = build_tokenizer(texts)
    tok.add_tokens([AddedToken(a, special=False, normalized=False) for a in ACTIONS])
    return tok


def hf_generate_fn(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, temperature: float,
                   max_new_tokens: int = 12):
    """A ``rollout.multiturn.GenerateFn`` on transformers' ``generate`` (the response text is decoded without
    special tokens, as vLLM's is). Seeds are not honoured: seed torch once beforehand (validation only)."""

    def generate_fn(prompts: list[str], seeds: list[int]) -> list[Rollout]:
        responses = sample_responses(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens)
        out = []
        for k, (prompt, (ids,)) in enumerate(zip(prompts, responses)):
            stop = bool(ids) and ids[-1] == tokenizer.eos_token_id
            out.append(Rollout(f"turn-{k}", tokenizer(prompt, add_special_tokens=False)["input_ids"], ids,
                               [0.0] * len(ids), "stop" if stop else "length", 0,
                               tokenizer.decode(ids, skip_special_tokens=True)))
        return out

    return generate_fn


def invalid_action_frac(model, tokenizer, states: list[tuple[int, int]], *, temperature: float,
                        num_samples: int = 1) -> float:
    """Share of responses to the observations of ``states`` that ``NumberTargetEnv.parse_action`` rejects."""
    env = NumberTargetEnv()
    responses = sample_responses(model, tokenizer, [observation(c, t, env) for c, t in states],
                                 num_samples=num_samples, temperature=temperature, max_new_tokens=12)
    bad = 0
    for (c, t), group in zip(states, responses):
        env.current, env.target = c, t
        bad += sum(env.parse_action(tokenizer.decode(r, skip_special_tokens=True)) is None for r in group)
    return bad / max(1, len(states) * num_samples)


def move_shares(model, tokenizer, states: list[tuple[int, int]], *, num_samples: int) -> dict[str, float]:
    """Of ``num_samples`` answers per state at T=1 that are valid actions: the share that play ``+1`` (states
    from 2 on: from 1 both moves lead to 2) and the share written as a number (``eval/sampled_*``)."""
    env = NumberTargetEnv()
    groups = sample_responses(model, tokenizer, [observation(c, t, env) for c, t in states],
                              num_samples=num_samples, temperature=1.0, max_new_tokens=12)
    plus1 = moves = numbers = valid = 0
    for (c, t), group in zip(states, groups):
        env.current, env.target = c, t
        for r in group:
            text = tokenizer.decode(r, skip_special_tokens=True)
            nxt = env.parse_action(text)
            if nxt is None:
                continue
            valid += 1
            numbers += text.strip().isdigit()
            if c > 1:
                moves += 1
                plus1 += nxt == c + 1
    return {"eval/sampled_plus1_frac": plus1 / max(1, moves), "eval/sampled_number_form_frac": numbers / max(1, valid)}


def play_metrics(model, tokenizer, *, temperature: float, num_groups: int = 64, group_size: int = 1) -> dict:
    """``rollout.multiturn.episode_metrics`` of episodes from the eval start states (seeds ``2**31 + i``)."""
    seeds = [EVAL_SEED_BASE + i for i in range(num_groups)]
    episodes = run_episodes(hf_generate_fn(model, tokenizer, temperature), NumberTargetEnv, seeds, group_size,
                            NumberTargetEnv().max_steps)
    return episode_metrics(episodes)


@contextmanager
def _torch_threads(n: int | None):
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_tiny_number_target_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    sft_steps: int = DEFAULT_SFT_MAX_STEPS,
    sft_batch_size: int = DEFAULT_SFT_BATCH_SIZE,
    sft_lr: float = DEFAULT_SFT_LR,
    sft_target_valid: float | None = DEFAULT_SFT_TARGET_VALID,
    check_every: int = 25,
    threads: int | None = 1,
    num_layers: int = 4,
    hidden_size: int = 128,
    eval_problems: int = 64,
    eval_samples: int = 8,
) -> dict[str, Any]:
    """Build, warm-start and save the tiny ``number_target`` model into ``out_dir``; return its metrics (also
    written to ``out_dir/tiny_model_build.json``).

    The warm start runs at most ``sft_steps`` steps and stops once the share of valid answers sampled at T=1 (two
    per reachable state) reaches ``sft_target_valid`` (None: exactly ``sft_steps``). ``threads``: torch CPU threads
    during the build (restored after; None: leave as is). One is as fast as two for this 1M-parameter model
    and far faster on a busy machine. With ``eval_problems > 0``:
    ``eval/{greedy,sampled}_invalid_frac`` (every state; sampled: ``eval_samples`` answers each at T=1),
    ``eval/sampled_plus1_frac`` (share of ``+1`` among the sampled valid answers) and
    ``eval/{greedy,sampled}_success`` (episodes from ``eval_problems`` eval start states, one greedy, and
    ``eval_samples`` at T=1, each).
    """
    with _torch_threads(threads):
        t0 = time.perf_counter()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        env = NumberTargetEnv()
        states = reachable_states(env)
        tokenizer = build_number_target_tokenizer(tokenizer_corpus(states, env))
        model = Qwen2ForCausalLM(tiny_qwen2_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers))
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        demos = demonstrations(states, env)
        rows = [encode_demonstration(tokenizer, prompt, response) for prompt, response in demos]
        losses, checks = supervised_warm_start(
            model, tokenizer, [], steps=sft_steps, batch_size=sft_batch_size, lr=sft_lr, seed=seed,
            target_accuracy=sft_target_valid, check_every=check_every, rows=rows,
            validate=lambda m: 1.0 - invalid_action_frac(m, tokenizer, states, temperature=1.0, num_samples=2),
        )
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        metrics: dict[str, Any] = {
            "task": "number_target",
            "seed": seed,
            "sft/states": len(states),
            "sft/rows": len(rows),
            **warm_start_metrics(model, tokenizer, losses, checks),
        }
        metrics["sft/val_valid_greedy"] = metrics.pop("sft/val_acc_greedy")
        metrics["build/time_s"] = time.perf_counter() - t0
        if eval_problems > 0:
            t1 = time.perf_counter()
            torch.manual_seed(seed)
            metrics["eval/greedy_invalid_frac"] = invalid_action_frac(model, tokenizer, states, temperature=0.0)
            metrics["eval/sampled_invalid_frac"] = invalid_action_frac(model, tokenizer, states, temperature=1.0,
                                                                       num_samples=eval_samples)
            metrics.update(move_shares(model, tokenizer, states, num_samples=eval_samples))
            for name, temp, n in (("greedy", 0.0, 1), ("sampled", 1.0, eval_samples)):
                m = play_metrics(model, tokenizer, temperature=temp, num_groups=eval_problems, group_size=n)
                metrics[f"eval/{name}_success"] = m["rollout/episode_success_frac"]
                metrics[f"eval/{name}_episode_invalid_frac"] = m["rollout/invalid_action_frac"]
            metrics["eval/time_s"] = time.perf_counter() - t1
    (out / "tiny_model_build.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded tiny number_target (GiGPO) model.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=DEFAULT_SFT_MAX_STEPS, help="upper bound on SFT steps")
    parser.add_argument("--sft-target-valid", type=float, default=DEFAULT_SFT_TARGET_VALID,
                        help="stop at this share of valid T=1 answers over all states (<0: run all steps)")
    parser.add_argument("--sft-lr", type=float, default=DEFAULT_SFT_LR)
    parser.add_argument("--eval-problems", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    metrics = build_tiny_number_target_model(
        args.out_dir, seed=args.seed, threads=args.threads, sft_steps=args.sft_steps, sft_lr=args.sft_lr,
        eval_problems=args.eval_problems,
        sft_target_valid=None if args.sft_target_valid < 0 else args.sft_target_valid,
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
