"""Checks before anything heavy starts: what the config names on disk, and on ``--resume`` the config against the
run's own."""

from __future__ import annotations

from pathlib import Path

from rl.config import Config, config_changes, dump_config, format_changes, resume_safe
from rl.data.datasets import load_jsonl_prompts, resolve_dataset


def preflight(cfg: Config) -> None:
    """Check what the config names on disk before anything heavy starts: the model directory, the JSONL data
    files, reward plug-ins (their names, files and keyword arguments) and the drafter's initial
    checkpoint. Raises ``ValueError`` listing every problem found, each naming its config key."""
    from rewards import RewardSpec, check_spec

    problems = []
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        problems.append(f"model.path={cfg.model.path!r}: no config.json there; give a transformers checkpoint "
                        "directory (use `rl convert-gguf` for a GGUF file)")
    for split in ("train", "eval"):
        ds = getattr(cfg.data, split)
        if ds.kind == "jsonl" and ds.path:
            try:
                path = resolve_dataset(ds.path, cfg.data.data_dir)
            except ValueError as e:
                problems.append(f"data.{split}.path: {e}")
                continue
            try:  # every row, as training will read it (a chat template is applied later, with the tokenizer)
                load_jsonl_prompts(path, problem_field=ds.problem_field, answer_field=ds.answer_field,
                                   id_field=ds.id_field, on_bad_row=ds.on_bad_row, limit=ds.num_problems,
                                   format_prompt=str)
            except ValueError as e:
                problems.append(f"data.{split}: {e}")
    for i, r in enumerate(cfg.rewards):
        try:
            check_spec(RewardSpec(name=r.name, weight=r.weight, kwargs=dict(r.kwargs)))
        except ValueError as e:
            problems.append(f"rewards[{i}]: {e}")
    if cfg.drafter.mode != "off" and cfg.drafter.init_path and not Path(cfg.drafter.init_path).is_dir():
        problems.append(f"drafter.init_path={cfg.drafter.init_path!r} is not a directory (a drafter checkpoint: "
                        "config.json + model.safetensors in vLLM's EAGLE format)")
    problems += _preflight_benchmarks_and_trackers(cfg)
    if problems:
        raise ValueError("the config names things that are not there:\n  - " + "\n  - ".join(problems))


def _preflight_benchmarks_and_trackers(cfg: Config) -> list[str]:
    """``eval.benchmarks`` that resolve to no file, and trackers whose package is not installed."""
    from rl.data.benchmarks import BUILTIN_BENCHMARKS
    from rl.tracking import missing_tracker_packages

    problems = []
    for i, name in enumerate(cfg.eval.benchmarks):
        if name in BUILTIN_BENCHMARKS or name.endswith(".parquet"):
            continue
        try:
            resolve_dataset(name, cfg.data.data_dir)
        except ValueError as e:
            problems.append(f"eval.benchmarks[{i}]: {e}")
    for name in missing_tracker_packages(cfg.run.trackers):
        problems.append(f"run.trackers: {name} is listed but its package is not installed (pip install {name}, "
                        "or drop it from run.trackers)")
    return problems


def check_resumed_config(cfg: Config, run_dir: Path, allow_config_change: bool) -> None:
    """On ``--resume``: this run's config against the run directory's ``config.yaml``. Every difference is
    printed; one outside ``rl.config.RESUME_SAFE_KEYS`` refuses the resume (``ValueError``) unless
    ``allow_config_change``."""
    import yaml

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    changes = config_changes(yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(dump_config(cfg)),
                             yaml.safe_load(dump_config(Config())))
    unsafe = [key for key, _, _ in changes if not resume_safe(key)]
    if unsafe and not allow_config_change:
        raise ValueError(f"--resume: this config differs from the run's {saved} in {', '.join(unsafe)}, which a "
                         f"resumed run may not change:\n{format_changes(changes)}\nResume with the run's config, "
                         "or pass --allow-config-change to continue the checkpoint under the new values.")
    if changes:
        print(f"[rl] --resume: config changes from {saved}:\n{format_changes(changes)}", flush=True)
