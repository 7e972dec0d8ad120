"""The ``rl`` command: ``rl train``, ``rl verify``, ``rl build-tiny``."""

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
    from rl.driver import CanaryError, train

    try:
        summary = train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    except (ValueError, CanaryError) as e:
        print(f"rl train: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


def _build_tiny(args: argparse.Namespace) -> int:
    from trainers.tiny_model import build_tiny_model

    print(json.dumps(build_tiny_model(args.out_dir, seed=args.seed), indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        from rewards.verify_cli import verify_main

        return verify_main(argv[1:])
    parser = argparse.ArgumentParser(prog="rl", description="RL post-training for LLM reasoning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy: rl train CONFIG [key=value ...]")
    p.add_argument("config", nargs="?", default=None, help="YAML recipe (e.g. configs/tiny_cpu.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.temperature=0.7 run.num_steps=50")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    p.add_argument("--ray-address", default=None, help="attach to a running Ray cluster (e.g. auto or ray://host:10001)")
    p.set_defaults(func=_train)

    sub.add_parser("verify", help="grade responses against gold answers (rl verify --help)")

    p = sub.add_parser("build-tiny", help="build the embedded tiny model into a directory")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_build_tiny)

    args = parser.parse_args(argv)
    # `rl train cfg.yaml a=1`: argparse puts a lone override into `config` when no file is given.
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides = [args.config] + args.overrides
        args.config = None
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
