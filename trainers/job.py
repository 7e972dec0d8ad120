"""A run's set-up and what it holds: ``start_job`` checks the config, starts the trackers, the model, Ray, the
reward pool, the engines and the learner, and wires the rollout kind, the step hooks, the batch source and the
weight sync into a ``Job``; the loop (``trainers.driver``) runs it. Checkpoints are written and read here."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rl.config import Config, dump_config
from rl.console import quiet_driver
from rl.data.datasets import PromptSampler, load_dataset
from rl.ray_init import start_ray
from rl.tracking import CheckpointManager, MetricsLogger, TrackerSettings
from rl.types import PromptItem
from trainers.batch_source import AsyncBatchSource, BatchSource
from trainers.learner_turn import LearnerTurn
from trainers.hooks import GdroHook, StepHook
from trainers.kinds import make_kind
from trainers.kinds.base import RolloutContext, RolloutKind, StepBatch
from trainers.preflight import check_resumed_config, preflight
from trainers.reward_guard import RewardErrorGuard
from trainers.stops import checkpoint_write_error, os_error_of
from trainers.sync import LearnerGroup, WeightSync

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "added_tokens.json", "chat_template.jinja", "tokenizer.model", "generation_config.json")


@dataclass
class Job:
    """Everything a run holds once it is set up. ``start_step`` is the step a resume continues after."""

    cfg: Config
    run_dir: Path
    logger: MetricsLogger
    ckpt: CheckpointManager
    learner: LearnerGroup
    engines: list
    ctx: RolloutContext
    kind: RolloutKind
    source: BatchSource
    sync: WeightSync
    turn: LearnerTurn
    reward_guard: RewardErrorGuard
    model_path: str
    hooks: list[StepHook] = field(default_factory=list)
    start_step: int = 0
    owns_ray: bool = False

    def evaluate(self, step: int) -> dict[str, float]:
        return self.kind.evaluate(self.ctx, step)

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return step == self.cfg.run.num_steps or bool(every and step % every == 0)

    def save_due(self, step: int) -> bool:
        every = self.cfg.run.save_every_steps
        return bool(every and step % every == 0) or step == self.cfg.run.num_steps

    def log_samples(self, step: int, batch: StepBatch) -> None:
        if batch.rows:
            self.logger.log_samples(step, batch.rows)

    def save_checkpoint(self, step: int) -> Path:
        """Written into a temporary folder and renamed. One that cannot be written (a full disk) is removed and
        stops the run with ``CheckpointWriteError``; the older checkpoints stay as they were."""
        tmp = None
        try:
            tmp = self.ckpt.begin(step)
            self.learner.call("save", str(tmp))
            copy_tokenizer_files(self.model_path, tmp / "model")  # so <checkpoint>/model is a complete model.path
            state = {"step": step, "sampler": self.source.sampler_state(step), "weight_version": step}
            state.update({hook.name: s for hook in self.hooks if (s := hook.state_dict()) is not None})
            return self.ckpt.commit(tmp, step, state)
        except Exception as exc:
            if (os_error := os_error_of(exc)) is None:
                raise
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # frees what it held, and no half checkpoint is left
            raise checkpoint_write_error(self, step, os_error) from exc

    def load_latest(self) -> None:
        latest = self.ckpt.latest()
        if latest is None:
            print(f"[rl] --resume: no checkpoint in {self.ckpt.root}; starting from step 0", flush=True)
            return
        state = json.loads((latest / "driver_state.json").read_text())
        self.learner.call("load", str(latest))
        self.ctx.sampler.load_state_dict(state["sampler"])
        for hook in self.hooks:
            hook.load_state_dict(state.get(hook.name), str(latest))
        self.start_step = int(state["step"])
        self.logger.truncate_after(self.start_step)
        print(f"[rl] resumed from {latest} at step {self.start_step}", flush=True)

    def close(self) -> None:
        close_all(self.logger, self.ctx.reward_pool, owns_ray=self.owns_ray)


def close_all(logger, reward_pool, owns_ray: bool) -> None:
    import ray

    for closer in (logger, reward_pool):
        if closer is not None:
            closer.close()
    if owns_ray and ray.is_initialized():
        ray.shutdown()


def copy_tokenizer_files(model_path: str, dest: Path) -> None:
    """Copy the tokenizer (and generation config) of the run's model next to a checkpoint's weights, so the
    checkpoint's ``model`` directory starts the next stage of a multi-stage recipe (``model.path``)."""
    for name in _TOKENIZER_FILES:
        src = Path(model_path) / name
        if src.is_file() and not (dest / name).exists():
            shutil.copy2(src, dest / name)


def start_job(cfg: Config, resume: bool = False, allow_config_change: bool = False) -> Job:
    """Set the run up, cheapest checks first (the config, the files it names) and the minute of start-up last.
    Whatever was started is closed again when a later part fails."""
    import ray

    from rl.algorithms.gdro import GdroController

    run_dir = Path(cfg.run.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    kind = make_kind(cfg)  # a bad kind, environment or plug-in fails here
    gdro = GdroController(cfg.gdro) if cfg.gdro.prompt_gdro or cfg.gdro.rollout_gdro else None
    quiet_driver(cfg.run.verbose)  # before the tiny model's build imports DeepSpeed
    preflight(cfg)  # before the tiny model's build, Ray and the engines: seconds, not a minute, to an error
    if resume:
        check_resumed_config(cfg, run_dir, allow_config_change)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    # trackers first: a wandb or MLflow that cannot start fails the run before a minute of start-up
    logger = MetricsLogger(run_dir, TrackerSettings(
        trackers=tuple(cfg.run.trackers), name=cfg.run.name or run_dir.name, project=cfg.run.project,
        tags=tuple(cfg.run.tags), config=cfg.model_dump(mode="json"),
        mlflow_tracking_uri=cfg.run.mlflow_tracking_uri, verbose=cfg.run.verbose), resume=resume)
    reward_pool = None
    owns_ray = not ray.is_initialized() and not cfg.ray.address
    try:
        model_path = resolve_model(cfg, run_dir)
        start_local_or_attach(cfg, run_dir)
        reward_pool = make_reward_pool(cfg, run_dir)
        from transformers import AutoTokenizer

        from trainers.actors import start_actors

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train_items, train_report = load_dataset(cfg.data.train, cfg.data.data_dir, tokenizer)
        eval_items, eval_report = load_dataset(cfg.data.eval, cfg.data.data_dir, tokenizer)
        for rep in (train_report, eval_report):
            if rep.skipped:
                print(f"[rl] {rep.path}: skipped {len(rep.skipped)} bad rows, e.g. line {rep.skipped[0][0]}: "
                      f"{rep.skipped[0][1]}", flush=True)
        benchmarks = load_benchmarks(cfg, tokenizer)
        sampler = PromptSampler(train_items, seed=cfg.run.seed)
        engines, learner, spec = start_actors(cfg, model_path, run_dir, resume)
        ctx = RolloutContext(cfg, engines=engines, reward_pool=reward_pool, sampler=sampler, tokenizer=tokenizer,
                             learner=learner, eval_items=eval_items, benchmarks=benchmarks, gdro=gdro)
        hooks: list[StepHook] = [h for h in (GdroHook(gdro) if gdro is not None else None, spec) if h is not None]
        job = assemble(cfg, run_dir, logger=logger, learner=learner, engines=engines, ctx=ctx, kind=kind,
                       hooks=hooks, model_path=model_path, owns_ray=owns_ray)
        if resume:
            job.load_latest()
        return job
    except BaseException:
        close_all(logger, reward_pool, owns_ray)
        raise


def assemble(cfg: Config, run_dir: Path, *, logger, learner, engines: list, ctx: RolloutContext,
             kind: RolloutKind, hooks: list[StepHook], model_path: str, owns_ray: bool = False,
             sync: WeightSync | None = None) -> Job:
    """A ``Job`` from its started parts: the weight sync, the batch source (async or not), the learner's turn
    (colocated or not), the reward-error guard and the checkpoint manager, as the config says."""
    sync = sync or WeightSync(cfg, learner, engines)
    if cfg.async_mode.enabled:
        source: BatchSource = AsyncBatchSource(kind, ctx, hooks, sync, cfg.run.num_steps,
                                               cfg.async_mode.max_off_policy_steps)
    else:
        source = BatchSource(kind, ctx, hooks, sync)
    pc = cfg.placement
    return Job(cfg=cfg, run_dir=run_dir, logger=logger, ckpt=CheckpointManager(run_dir, cfg.run.keep_last_checkpoints),
               learner=learner, engines=engines, ctx=ctx, kind=kind, source=source, sync=sync,
               turn=LearnerTurn(engines, pc.mode == "colocated", pc.engine_sleep_level),
               reward_guard=RewardErrorGuard(ctx.reward_pool, cfg.reward_pool.max_error_rate),
               model_path=model_path, hooks=hooks, owns_ray=owns_ray)


def load_benchmarks(cfg: Config, tokenizer) -> dict[str, list[PromptItem]]:
    """The ``eval.benchmarks`` problems, formatted as ``rl eval`` formats them."""
    ec = cfg.eval
    if not ec.benchmarks:
        return {}
    from rl.data.benchmarks import load_benchmark, make_prompt_formatter, parse_benchmarks

    fmt, _ = make_prompt_formatter(tokenizer, ec.benchmark_template)
    limit = str(ec.benchmark_limit) if ec.benchmark_limit else None
    return {spec.name: load_benchmark(spec, fmt, cfg.data.data_dir)[0]
            for spec in parse_benchmarks(",".join(ec.benchmarks), limit)}


def resolve_model(cfg: Config, run_dir: Path) -> str:
    """``model.path``, or the embedded tiny model built into ``<run>/tiny_model`` (once)."""
    mc = cfg.model
    if mc.path is not None:
        path = Path(mc.path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path={mc.path!r}: no config.json there; give a transformers checkpoint "
                             "directory (use `rl convert-gguf` for a GGUF file)")
        return str(path.resolve())
    out = run_dir / "tiny_model"
    if (out / "config.json").is_file():
        return str(out)
    if mc.tiny.task == "dccot_sum":
        from trainers.tiny_dccot import build_tiny_dccot_model as build_tiny_model
    elif mc.tiny.task == "number_target":
        from trainers.tiny_number_target import build_tiny_number_target_model as build_tiny_model
    else:
        from trainers.tiny_model import build_tiny_model

    print(f"[rl] building the embedded tiny {mc.tiny.task} model into {out} ...", flush=True)
    kwargs = {"seed": mc.tiny.seed, "eval_problems": 0}
    if mc.tiny.sft_steps is not None:
        kwargs["sft_steps"] = mc.tiny.sft_steps
    tmp = out.with_name(out.name + ".tmp")
    info = build_tiny_model(tmp, **kwargs)
    os.replace(tmp, out)
    facts = [f"{info['model/num_params'] / 1e6:.2f}M parameters"] if "model/num_params" in info else []
    facts += [f"{info['sft/steps']} warm-start steps"] if "sft/steps" in info else []
    facts += [f"greedy accuracy {info['sft/val_acc_greedy']:.3f}"] if info.get("sft/val_acc_greedy") is not None else []
    print(f"[rl] tiny model ready in {info.get('build/time_s', 0):.0f} s: {', '.join(facts)} "
          f"(details: {out / 'tiny_model_build.json'})", flush=True)
    return str(out)


def start_local_or_attach(cfg: Config, run_dir: Path) -> None:
    """A local Ray sized for the run's actors, or attach to ``ray.address`` (nothing when Ray is up already)."""
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        num_cpus = None
    else:
        pc = cfg.placement
        if pc.learner_node_labels or pc.engine_node_labels:
            raise ValueError("placement.learner_node_labels / engine_node_labels choose among a cluster's labelled "
                             "nodes: set ray.address (a local Ray is one node without labels) or clear them")
        r, lc = cfg.rollout, cfg.learner
        need = int(np.ceil(r.num_engines * r.num_cpus_per_engine + lc.num_ranks * lc.num_cpus)) + 1
        num_cpus = cfg.ray.num_cpus or max(need, os.cpu_count() or 1)
    start_ray(cfg.ray.address, num_cpus, run_dir / "logs", cfg.run.verbose)


def make_reward_pool(cfg: Config, run_dir: Path):
    from rewards import RewardPool, RewardSpec

    pc = cfg.reward_pool
    specs = [RewardSpec(name=r.name, weight=r.weight, kwargs=dict(r.kwargs)) for r in cfg.rewards]
    return RewardPool(specs, num_workers=pc.num_workers, timeout_s=pc.timeout_s,
                      audit_fraction=pc.audit_fraction, audit_log_path=str(run_dir / "audit.jsonl"),
                      seed=cfg.run.seed)
