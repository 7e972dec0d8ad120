"""The training driver: one RL step after another, as in DESIGN.md's data flow.

    pick prompts -> generate (vLLM engine actors) -> score (reward pool) -> advantages -> learner update
    -> sync weights to the engines + canary -> log, evaluate, checkpoint

Runs on a local Ray (started here) or attaches to a cluster (``ray.address``). Everything a resume needs
(learner weights, optimizer, RNG, sampler position, step) is in each checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rl.algorithms import ADVANTAGE_ESTIMATORS, AdvantageInput
from rl.algorithms.dapo import keep_group, overlong_penalty
from rl.algorithms.smoothing import shape_advantages
from rl.config import Config, config_changes, dump_config, format_changes, resume_safe
from rl.console import quiet_driver
from rl.data.datasets import PromptSampler, load_dataset, load_jsonl_prompts, resolve_dataset
from rl.ray_init import actor_env_vars, start_ray  # noqa: F401  (actor_env_vars: part of this module's API)
from rl.round_robin import deal, interleave
from rl.seeding import stable_seed
from rl.tracking import CheckpointManager, MetricsLogger, Progress, TrackerSettings
from rl.types import PromptItem, RewardResult, Rollout, TrainSample


class CanaryError(RuntimeError):
    """The engines do not serve the weights the learner has: rollouts would be off-policy without anyone knowing."""


class RewardError(ValueError):
    """A configured reward errored on at least ``reward_pool.max_error_rate`` of a step's responses: training on
    its fail-closed zeros would be a silent 0."""


class ActorDiedError(RuntimeError):
    """An engine or learner actor died mid-run; the message names it, says why, and where the run was saved."""


# A reward that keeps erroring below the stop threshold is warned about at most once per this many steps.
_REWARD_WARN_EVERY_STEPS = 10


def _split(flat: list, sizes: list[int]) -> list[list]:
    """Cut a flat list into consecutive chunks of the given sizes."""
    out, start = [], 0
    for n in sizes:
        out.append(flat[start : start + n])
        start += n
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "added_tokens.json", "chat_template.jinja", "tokenizer.model", "generation_config.json")


def _copy_tokenizer_files(model_path: str, dest: Path) -> None:
    """Copy the tokenizer (and generation config) of the run's model next to a checkpoint's weights, so the
    checkpoint's ``model`` directory starts the next stage of a multi-stage recipe (``model.path``)."""
    import shutil

    for name in _TOKENIZER_FILES:
        src = Path(model_path) / name
        if src.is_file() and not (dest / name).exists():
            shutil.copy2(src, dest / name)


def _dapo_metrics(rounds: int, generated: int, dropped: int, kept: int, target: int) -> dict[str, float]:
    """Dynamic sampling's per-step counters: generation rounds, prompts generated, share filtered, batch fill."""
    return {
        "dapo/gen_rounds": float(rounds),
        "dapo/prompts_generated": float(generated),
        "dapo/filtered_group_frac": dropped / max(generated, 1),
        "dapo/batch_fill_frac": kept / target,
    }


# The driver's communication settings reach every actor on every node: network interfaces, InfiniBand, debug
# output and timeouts of NCCL (learner process group, tensor-parallel engines) and gloo (the CPU-side group).
# Learner ranks only: an allocator setting such as expandable_segments conflicts with vLLM's sleep-mode allocator.
_LEARNER_ONLY = ("PYTORCH_CUDA_ALLOC_CONF",)


def learner_env_vars() -> dict[str, str]:
    """The learner actors' own environment (their ``runtime_env``): ``PYTORCH_CUDA_ALLOC_CONF`` when the driver has
    it, so the learner's allocator can be tuned without touching the engines'."""
    return {k: os.environ[k] for k in _LEARNER_ONLY if k in os.environ}


def engine_env_vars() -> dict[str, str]:
    """The engine actors' own environment: learner-only keys the driver has are blanked, because a local Ray's
    workers inherit the driver's environment (an empty ``PYTORCH_CUDA_ALLOC_CONF`` is PyTorch's default)."""
    return {k: "" for k in _LEARNER_ONLY if k in os.environ}


def _cpu_binding(index: int, count: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for CPU engine ``index`` of ``count`` on this machine: a disjoint core range."""
    cores = os.cpu_count() or 1
    per = max(1, cores // count)
    first = (index * per) % cores
    return str(first) if per == 1 else f"{first}-{first + per - 1}"


def engine_actor_options(cfg: Config, placed, index: int) -> dict:
    """Ray ``.options(...)`` of engine ``index``: its resources in bundle ``index`` of the engine group
    (``rl.placement``) and its own environment (learner-only keys blanked; on a local CPU Ray, its own cores)."""
    from rl import placement

    r = cfg.rollout
    env = engine_env_vars()
    if (not cfg.ray.address and r.num_gpus_per_engine == 0 and r.num_engines > 1
            and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ):
        # vLLM CPU engines bind their threads to the same core by default; give each its own core(s)
        env["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_binding(index, r.num_engines)
    return placement.engine_options(cfg, placed, index, env)


def learner_actor_options(cfg: Config, placed, rank: int) -> dict:
    """Ray ``.options(...)`` of learner rank ``rank``: its resources in bundle ``rank`` of the learner group
    (``rl.placement``) and its own environment (``learner_env_vars``)."""
    from rl import placement

    return placement.learner_options(cfg, placed, rank, learner_env_vars())


def request_seed(run_seed: int, step: int, index: int) -> int:
    """Per-request sampling seed: the same (run, step, prompt slot) always samples the same responses."""
    return stable_seed(run_seed, step, index, digest="sha256")


class LearnerGroup:
    """The learner ranks (Ray actors of ``trainers.learner.Learner`` in one process group). Every call goes to all
    ranks with the same arguments (the model methods are collectives under FSDP2) and returns rank 0's answer."""

    def __init__(self, actors: list) -> None:
        self.actors = actors

    def submit(self, method: str, *args, **kwargs) -> list:
        """Start ``method`` on every rank; the per-rank object refs (rank 0 first). Arguments go into the object
        store once, not once per rank."""
        import ray

        if len(self.actors) > 1:
            args = tuple(ray.put(a) for a in args)
            kwargs = {k: ray.put(v) for k, v in kwargs.items()}
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call(self, method: str, *args, **kwargs):
        import ray

        return ray.get(self.submit(method, *args, **kwargs))[0]


def push_weights(learner: LearnerGroup, engines: list, version: int, bucket_bytes: int) -> dict[str, float]:
    """The learner's whole weights into every engine, in buckets of about ``bucket_bytes`` (0: one piece) through
    the object store. The learner gathers bucket b+1 while the engines load bucket b: at most two buckets are in
    flight. Returns ``perf/weight_sync_s`` (all of it), ``perf/weight_load_s`` (the slowest engine's own loading;
    the rest is the learner's gather and serialization and the transfer, less what overlapped), bytes, buckets."""
    import ray

    t0 = time.perf_counter()
    n = learner.call("begin_weight_export", bucket_bytes)
    others, loading, infos = [], [], []
    for b in range(n):
        refs = learner.submit("next_weight_bucket", b)  # rank 0's ref carries the bytes
        others += refs[1:]
        loads = [e.load_weight_bucket.remote(refs[0], version, b == n - 1) for e in engines]
        infos += ray.get(loading)
        loading = loads
    infos += ray.get(loading)
    ray.get(others)
    per_engine = [sum(float(i["sync_s"]) for i in infos[k::len(engines)]) for k in range(len(engines))]
    return {"perf/weight_sync_s": time.perf_counter() - t0, "perf/weight_load_s": max(per_engine),
            "sync/weight_version": float(version), "sync/buckets": float(n),
            "sync/bytes": float(sum(i["bytes"] for i in infos[::len(engines)]))}


class WeightSyncError(RuntimeError):
    """A weight sync that broke off: the message names the engine (or learner rank) and the bucket. ``actor_error``
    is Ray's ``RayActorError`` when the cause was an actor that died (the run then reports it as that actor's
    death, with what was saved)."""

    def __init__(self, message: str, what: str = "weight sync", actor_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.what = what
        self.actor_error = actor_error


def _wait_all(labelled: list[tuple[str, object]], what: str) -> list:
    """``ray.get`` of every ref, in order, returning as soon as one fails: a ``WeightSyncError`` naming its label
    (``engine 1``, ``learner rank 0 (sender)``) and ``what``. The others are left running (a broken transfer group
    ends them at its timeout)."""
    import ray
    from ray.exceptions import RayActorError

    index = {ref: k for k, (_, ref) in enumerate(labelled)}
    results: list = [None] * len(labelled)
    pending = [ref for _, ref in labelled]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        k = index[ready[0]]
        try:
            results[k] = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - a task's error or a dead actor, reported with who and where
            cause = getattr(e, "cause", None) or e
            text = str(cause).strip().splitlines()
            raise WeightSyncError(f"{what} broke off on {labelled[k][0]}: {type(cause).__name__}: "
                                  f"{text[-1][:500] if text else ''}",
                                  what, actor_error=e if isinstance(e, RayActorError) else None) from None
    return results


def init_weight_transfer(learner: LearnerGroup, engines: list, tensor_parallel_size: int, timeout_s: float,
                         transport: str = "gloo") -> float:
    """Set up ``sync.transport`` (resolved) on both sides. ``gloo`` / ``nccl``: form the transfer group of learner
    rank 0 (the sender, rank 0 of the group, hosting its rendezvous) and every engine's workers (engine i at ranks
    ``1 + i * tensor_parallel_size`` onwards: each engine its own offset). ``ipc``: the sender and the engines'
    transfer engines start (nothing to join). Returns seconds."""
    import ray

    t0 = time.perf_counter()
    if transport == "ipc":
        sends = learner.submit("init_weight_transport", None, None, 0, timeout_s, transport)
        joins = [e.init_weight_transfer.remote({}) for e in engines]
        what = "the ipc weight transfer's start"
    else:
        address, port = ray.get(learner.actors[0].weight_transport_address.remote())
        world = 1 + len(engines) * tensor_parallel_size
        sends = learner.submit("init_weight_transport", address, port, world, timeout_s, transport)
        joins = [e.init_weight_transfer.remote({"master_address": address, "master_port": port,
                                                "rank_offset": 1 + i * tensor_parallel_size, "world_size": world,
                                                "timeout_s": timeout_s})
                 for i, e in enumerate(engines)]
        what = f"the weight transfer group's rendezvous at {address}:{port} ({world} ranks)"
    _wait_all([(f"engine {i}", r) for i, r in enumerate(joins)] + list(zip(_rank_labels(learner), sends)), what)
    return time.perf_counter() - t0


def _rank_labels(learner: LearnerGroup) -> list[str]:
    return [f"learner rank {k}" + (" (sender)" if k == 0 else "") for k in range(len(learner.actors))]


def _start_bucket(learner: LearnerGroup, engines: list, meta: dict, handoff: bool, what: str, method: str,
                  *args) -> tuple[list, dict | None]:
    """Start one bucket's transfer: the learner ranks' ``method`` (gather; rank 0 sends) and every engine's
    ``update_weights``. A collective transport runs them together (they meet in the broadcast; each call queued
    behind the previous bucket's on its actor) and returns them all to wait for. ``handoff`` (``ipc``): rank 0
    packs into a shared buffer first, then the engines get its handle; returns the engines' calls and rank 0's
    result."""
    sends = list(zip(_rank_labels(learner), learner.submit(method, *args)))
    if handoff:
        sent = _wait_all(sends, what)[0]
        meta = {**meta, "handle": sent.pop("handle")}
        return [(f"engine {i}", e.update_weights.remote(meta)) for i, e in enumerate(engines)], sent
    return [(f"engine {i}", e.update_weights.remote(meta)) for i, e in enumerate(engines)] + sends, None


def _await_bucket(started: tuple[list, dict | None], what: str, num_engines: int) -> dict:
    """Wait for a bucket ``_start_bucket`` started; returns rank 0's send result (gather, pack and send times)."""
    labelled, handed = started
    results = _wait_all(labelled, what)
    return handed if handed is not None else results[num_engines]


def push_weights_transfer(learner: LearnerGroup, engines: list, version: int, bucket_bytes: int,
                          handoff: bool = False) -> dict[str, float]:
    """``push_weights`` over vLLM's weight-transfer API (``sync.transport`` gloo / nccl / ipc, set up by
    ``init_weight_transfer``): every engine starts an update; per bucket, the learner ranks gather it and rank 0
    sends it (a broadcast, or a shared buffer's handle: ``handoff``) while the engines receive and load it
    (``update_weights`` with the bucket's names, dtypes and shapes), the next bucket's gather overlapping the
    engines' loading; then every engine finishes (checks that every parameter arrived, clears its prefix cache,
    serves ``version``). The engines' version moves only in that last call, so a sync that breaks off (a
    ``WeightSyncError`` naming the engine and the bucket) leaves every engine at its old version."""
    t0 = time.perf_counter()
    n = learner.call("begin_weight_export", bucket_bytes, False)
    metas = learner.call("weight_bucket_meta")
    _wait_all([(f"engine {i}", e.start_weight_update.remote()) for i, e in enumerate(engines)],
              f"weight sync to version {version} (start)")
    sent: list[dict] = []
    in_flight: list[tuple[str, tuple]] = []
    for b in range(n + 1):
        if b < n:
            what = f"weight sync to version {version} at bucket {b + 1}/{n}"
            in_flight.append((what, _start_bucket(learner, engines, metas[b], handoff, what, "send_weight_bucket", b)))
        if len(in_flight) == 2 or (b == n and in_flight):
            what, started = in_flight.pop(0)
            sent.append(_await_bucket(started, what, len(engines)))
    done = _wait_all([(f"engine {i}", e.finish_weight_update.remote(version)) for i, e in enumerate(engines)],
                     f"weight sync to version {version} (finish: every parameter must have arrived)")
    if handoff:
        learner.call("release_weight_buffers")
    return {"perf/weight_sync_s": time.perf_counter() - t0,
            "perf/weight_load_s": max(d["load_s"] + d["finish_s"] for d in done),
            "perf/weight_gather_s": sum(s["gather_s"] for s in sent),
            "perf/weight_send_s": sum(s["pack_s"] + s["send_s"] for s in sent),
            "sync/weight_version": float(version), "sync/buckets": float(n),
            "sync/bytes": float(sum(s["bytes"] for s in sent))}


def push_drafter_transfer(learner: LearnerGroup, engines: list, handoff: bool = False) -> dict[str, float]:
    """The speculative drafter's own weights into every engine over the weight transfer, as one bucket: vLLM's
    ``start_draft_weight_update`` retargets the engines' transfer engine at the drafter for this update (the
    embedding and LM head it shares with the target are not sent). The target's version does not move."""
    meta = learner.call("drafter_transfer_meta")
    _wait_all([(f"engine {i}", e.start_weight_update.remote(True)) for i, e in enumerate(engines)],
              "drafter publish (start)")
    started = _start_bucket(learner, engines, meta, handoff, "drafter publish", "send_drafter")
    sent = _await_bucket(started, "drafter publish", len(engines))
    _wait_all([(f"engine {i}", e.finish_weight_update.remote(None)) for i, e in enumerate(engines)],
              "drafter publish (finish)")
    if handoff:
        learner.call("release_weight_buffers")
    return {"bytes": float(sent["bytes"])}


def _push_adapter(*args, **kwargs) -> dict[str, float]:
    from rl.lora_sync import push_adapter

    return push_adapter(*args, **kwargs)


WEIGHT_PUSH = {"object_store": push_weights, "gloo": push_weights_transfer, "nccl": push_weights_transfer,
               "ipc": functools.partial(push_weights_transfer, handoff=True), "adapter": _push_adapter}
"""``sync.transport`` (resolved; ``adapter`` with ``model.lora``) -> the push that runs it."""
ENGINE_WEIGHT_TRANSFER = {"object_store": None, "gloo": "gloo", "nccl": "rl_nccl", "ipc": "rl_ipc", "adapter": None}
"""``sync.transport`` (resolved) -> the backend of vLLM's weight-transfer API the engines start with
(``rollout.weight_transfer``)."""


def canary_gap(want: list[list[float]], got: list[list[float]]) -> tuple[float, float]:
    """(mean, max) absolute difference of two sets of per-token log-probs of the same sequences."""
    if [len(w) for w in want] != [len(g) for g in got]:
        raise ValueError(f"canary: token counts differ ({[len(w) for w in want]} vs {[len(g) for g in got]})")
    diffs = [abs(a - b) for w, g in zip(want, got) for a, b in zip(w, g)]
    return sum(diffs) / max(len(diffs), 1), max(diffs, default=0.0)


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


class Trainer:
    """Owns the actors and the loop. ``run()`` trains; ``close()`` releases everything."""

    def __init__(self, cfg: Config, resume: bool = False, allow_config_change: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.allow_config_change = allow_config_change
        self.estimator = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage_estimator)
        self._stop_requested = False
        # The step whose update the learner holds (or is applying): a checkpoint labelled with any other step
        # would hold another step's weights.
        self._learner_step = 0
        self._reward_error_warned: dict[str, int] = {}  # reward name -> step of its last warning
        self.engine_version = 0  # the policy version the engines serve (set by every sync)
        self._pending: dict[int, dict] = {}  # async mode: batches generated ahead, by the step that trains on them
        # The sampler's state just before each step's prompts were drawn: a checkpoint of step s taken after
        # step s+1's batch was prepared (async mode) or while it was being prepared (an interrupt) saves the
        # position before s+1's draws, so a resume draws those prompts again instead of skipping them.
        self._sampler_marks: dict[int, dict] = {}
        self.spec = None  # rl.spec_decode.DrafterController when drafter.mode is not off
        self.gdro = None
        if cfg.gdro.prompt_gdro or cfg.gdro.rollout_gdro:
            from rl.algorithms.gdro import GdroController

            self.gdro = GdroController(cfg.gdro)
        if cfg.multiturn.env is not None:
            from rollout.env import make_env

            make_env(cfg.multiturn.env, **cfg.multiturn.env_options)  # fail now on a bad name or option

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        quiet_driver(self.cfg.run.verbose)  # before the tiny model's build imports DeepSpeed
        cfg = self.cfg
        preflight(cfg)  # before the tiny model's build, Ray and the engines: seconds, not a minute, to an error
        self._check_resumed_config()
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        # trackers first: a wandb or MLflow that cannot start fails the run before a minute of start-up
        self.logger = MetricsLogger(self.run_dir, TrackerSettings(
            trackers=tuple(cfg.run.trackers), name=cfg.run.name or self.run_dir.name, project=cfg.run.project,
            tags=tuple(cfg.run.tags), config=cfg.model_dump(mode="json"),
            mlflow_tracking_uri=cfg.run.mlflow_tracking_uri, verbose=cfg.run.verbose), resume=self.resume)
        self.model_path = self._resolve_model()
        self._start_ray()
        self.reward_pool = self._make_reward_pool()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.tokenizer = tokenizer
        self.train_items, train_report = load_dataset(cfg.data.train, cfg.data.data_dir, tokenizer)
        self.eval_items, eval_report = load_dataset(cfg.data.eval, cfg.data.data_dir, tokenizer)
        for rep in (train_report, eval_report):
            if rep.skipped:
                print(f"[rl] {rep.path}: skipped {len(rep.skipped)} bad rows, e.g. line {rep.skipped[0][0]}: "
                      f"{rep.skipped[0][1]}", flush=True)
        self.benchmarks = self._load_benchmarks(tokenizer)
        self.sampler = PromptSampler(self.train_items, seed=cfg.run.seed)
        self.engines, self.learner = self._start_actors()
        self.ckpt = CheckpointManager(self.run_dir, cfg.run.keep_last_checkpoints)
        self.start_step = 0
        if self.resume:
            self._load_latest()
        self.probe = None

    def _check_resumed_config(self) -> None:
        """On ``--resume``: this run's config against the run directory's ``config.yaml``. Every difference is
        printed; one outside ``rl.config.RESUME_SAFE_KEYS`` refuses the resume (``ValueError``) unless
        ``allow_config_change``."""
        import yaml

        saved = self.run_dir / "config.yaml"
        if not self.resume or not saved.is_file():
            return
        changes = config_changes(yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(dump_config(self.cfg)),
                                 yaml.safe_load(dump_config(Config())))
        unsafe = [key for key, _, _ in changes if not resume_safe(key)]
        if unsafe and not self.allow_config_change:
            raise ValueError(f"--resume: this config differs from the run's {saved} in {', '.join(unsafe)}, which a "
                             f"resumed run may not change:\n{format_changes(changes)}\nResume with the run's config, "
                             "or pass --allow-config-change to continue the checkpoint under the new values.")
        if changes:
            print(f"[rl] --resume: config changes from {saved}:\n{format_changes(changes)}", flush=True)

    def _load_benchmarks(self, tokenizer) -> dict[str, list[PromptItem]]:
        """The ``eval.benchmarks`` problems, formatted as ``rl eval`` formats them."""
        ec = self.cfg.eval
        if not ec.benchmarks:
            return {}
        from rl.data.benchmarks import load_benchmark, make_prompt_formatter, parse_benchmarks

        fmt, _ = make_prompt_formatter(tokenizer, ec.benchmark_template)
        limit = str(ec.benchmark_limit) if ec.benchmark_limit else None
        return {spec.name: load_benchmark(spec, fmt, self.cfg.data.data_dir)[0]
                for spec in parse_benchmarks(",".join(ec.benchmarks), limit)}

    def _resolve_model(self) -> str:
        cfg = self.cfg.model
        if cfg.path is not None:
            path = Path(cfg.path)
            if not (path / "config.json").is_file():
                raise ValueError(f"model.path={cfg.path!r}: no config.json there; give a transformers checkpoint "
                                 "directory (use `rl convert-gguf` for a GGUF file)")
            return str(path.resolve())
        out = self.run_dir / "tiny_model"
        if (out / "config.json").is_file():
            return str(out)
        if cfg.tiny.task == "dccot_sum":
            from trainers.tiny_dccot import build_tiny_dccot_model as build_tiny_model
        else:
            from trainers.tiny_model import build_tiny_model

        print(f"[rl] building the embedded tiny {cfg.tiny.task} model into {out} ...", flush=True)
        kwargs = {"seed": cfg.tiny.seed, "eval_problems": 0}
        if cfg.tiny.sft_steps is not None:
            kwargs["sft_steps"] = cfg.tiny.sft_steps
        tmp = out.with_name(out.name + ".tmp")
        info = build_tiny_model(tmp, **kwargs)
        os.replace(tmp, out)
        facts = [f"{info['model/num_params'] / 1e6:.2f}M parameters"] if "model/num_params" in info else []
        facts += [f"{info['sft/steps']} warm-start steps"] if "sft/steps" in info else []
        facts += [f"greedy accuracy {info['sft/val_acc_greedy']:.3f}"] if "sft/val_acc_greedy" in info else []
        print(f"[rl] tiny model ready in {info.get('build/time_s', 0):.0f} s: {', '.join(facts)} "
              f"(details: {out / 'tiny_model_build.json'})", flush=True)
        return str(out)

    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.cfg.ray.address:
            num_cpus = None
        else:
            pc = self.cfg.placement
            if pc.learner_node_labels or pc.engine_node_labels:
                raise ValueError("placement.learner_node_labels / engine_node_labels choose among a cluster's labelled "
                                 "nodes: set ray.address (a local Ray is one node without labels) or clear them")
            r, lc = self.cfg.rollout, self.cfg.learner
            need = int(np.ceil(r.num_engines * r.num_cpus_per_engine + lc.num_ranks * lc.num_cpus)) + 1
            num_cpus = self.cfg.ray.num_cpus or max(need, os.cpu_count() or 1)
        start_ray(self.cfg.ray.address, num_cpus, self.run_dir / "logs", self.cfg.run.verbose)

    def _make_reward_pool(self):
        from rewards import RewardPool, RewardSpec

        pc = self.cfg.reward_pool
        specs = [RewardSpec(name=r.name, weight=r.weight, kwargs=dict(r.kwargs)) for r in self.cfg.rewards]
        return RewardPool(specs, num_workers=pc.num_workers, timeout_s=pc.timeout_s,
                          audit_fraction=pc.audit_fraction, audit_log_path=str(self.run_dir / "audit.jsonl"),
                          seed=self.cfg.run.seed)

    def _placement_groups(self):
        """The run's reserved placement groups (``rl.placement``): one bundle per learner rank and per engine
        (disaggregated), or one shared bundle per (rank i, engine i) pair (colocated)."""
        from rl.placement import reserve

        return reserve(self.cfg)

    def _start_actors(self):
        """Reserve the placement groups, start the engines and wait until they are up (vLLM sizes its KV cache from
        the device's free memory, so no learner may be loading beside it), then start the learner ranks."""
        import ray

        from rl import placement
        from rollout.engine import Engine
        from trainers.distributed import free_address
        from trainers.learner import learner_class
        from trainers.settings import LearnerSettings

        cfg = self.cfg
        r, lc, pc = cfg.rollout, cfg.learner, cfg.placement
        colocated = pc.mode == "colocated"
        placed = self._placement_groups()
        speculative_config = None
        if cfg.drafter.mode != "off":
            from rl.spec_decode import DrafterController

            resume_from = CheckpointManager(self.run_dir, cfg.run.keep_last_checkpoints).latest() if self.resume else None
            self.spec = DrafterController(cfg.drafter, self.run_dir, self.model_path, cfg.run.seed, resume_from)
            speculative_config = self.spec.speculative_config()
        t0 = time.perf_counter()
        engines = []
        for i in range(r.num_engines):
            engines.append(ray.remote(Engine).options(**engine_actor_options(cfg, placed, i)).remote(
                self.model_path, dtype=r.dtype or cfg.model.dtype, seed=cfg.run.seed + i, max_model_len=r.max_model_len,
                gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
                tensor_parallel_size=r.tensor_parallel_size,
                enable_sleep_mode=colocated and pc.engine_sleep_level > 0, speculative_config=speculative_config,
                model_runner=r.model_runner, weight_transfer=ENGINE_WEIGHT_TRANSFER[cfg.weight_transport()],
                max_lora_rank=cfg.model.lora.engine_max_rank() if cfg.model.lora is not None else None,
                adapter_dir=str(self.run_dir / "adapters" / f"engine{i}") if cfg.model.lora is not None else None,
            ))
        ray.get([e.ping.remote() for e in engines])
        t1 = time.perf_counter()
        # The rendezvous port is picked on rank 0's node just before the ranks bind it (a port free now may not be
        # free minutes later).
        master = ray.get(ray.remote(free_address).options(**placement.rank0_options(placed)).remote())
        settings = LearnerSettings.from_config(cfg)
        actors = [
            ray.remote(learner_class(lc.strategy)).options(**learner_actor_options(cfg, placed, k)).remote(
                self.model_path, settings, cfg.algorithm, temperature=r.temperature,
                seed=cfg.run.seed, dtype=cfg.model.dtype, export_dtype=r.dtype or cfg.model.dtype, rank=k,
                world_size=lc.num_ranks, master=master)
            for k in range(lc.num_ranks)
        ]
        ray.get([a.ping.remote() for a in actors])
        logs = "" if cfg.run.verbose else f"; their logs: {self.run_dir / 'logs'}/ (--verbose shows them here)"
        print(f"[rl] {len(engines)} engine(s) up in {t1 - t0:.0f} s, then {len(actors)} learner rank(s) "
              f"({lc.strategy}, {pc.mode}) in {time.perf_counter() - t1:.0f} s{logs}", flush=True)
        if colocated and pc.engine_sleep_level > 0 and not ray.get(engines[0].sleep_supported.remote()):
            print("[rl] placement colocated: this vLLM build has no sleep mode (CPU), so a sleeping engine only pauses "
                  "its scheduler while the learner trains (no memory is freed)", flush=True)
        group = LearnerGroup(actors)
        transport = cfg.weight_transport()
        if ENGINE_WEIGHT_TRANSFER[transport] is not None:
            took = init_weight_transfer(group, engines, r.tensor_parallel_size, cfg.sync.transport_timeout_s,
                                        transport)
            formed = ("shared buffers, no group" if transport == "ipc" else
                      f"transfer group of {1 + len(engines) * r.tensor_parallel_size} ranks formed")
            print(f"[rl] weight sync over {transport}: {formed} in {took:.1f} s", flush=True)
        if self.spec is not None:
            self._drafter_start_metrics = self.spec.attach(engines, group)
            if ENGINE_WEIGHT_TRANSFER[transport] is not None:  # the drafter goes the way the target's weights go
                self.spec.push_drafter = lambda: push_drafter_transfer(group, engines, handoff=transport == "ipc")
        return engines, group

    # ------------------------------------------------------------------ pieces of a step
    def generate(self, items: list[PromptItem], n: int | list[int], step: int, temperature: float, max_tokens: int,
                 seed_offset: int = 0) -> list[list[Rollout]]:
        """``n`` samples per item (one count for all, or one per item), spread round-robin over the engines;
        groups come back in item order. Request ``i`` is seeded from (run seed, step, seed_offset + i)."""
        from rollout.engine import GenerationRequest, SamplingSettings

        counts = [n] * len(items) if isinstance(n, int) else list(n)
        if len(counts) != len(items):
            raise ValueError(f"got {len(counts)} sample counts for {len(items)} prompts")
        settings = SamplingSettings(temperature=temperature, top_p=self.cfg.rollout.top_p, max_tokens=max_tokens)
        reqs = [
            GenerationRequest(it.id, it.prompt, c, request_seed(self.cfg.run.seed, step, seed_offset + i))
            for i, (it, c) in enumerate(zip(items, counts))
        ]
        return self._dispatch(reqs, settings)

    def _dispatch(self, reqs, settings) -> list[list[Rollout]]:
        """Requests round-robin over the engine actors; one group per request, in request order."""
        import ray

        k = len(self.engines)
        shards = deal(reqs, k)
        results = ray.get([e.generate.remote(s, settings) for e, s in zip(self.engines, shards) if s])
        return interleave(results)

    def score(self, items: list[PromptItem], groups: list[list[Rollout]]):
        from rewards import reward_request

        reqs = [reward_request(it, r, j) for it, g in zip(items, groups) for j, r in enumerate(g)]
        return self.reward_pool.score(reqs)

    def sync_weights(self, version: int) -> dict[str, float]:
        """``push`` then ``canary``: for engines that are awake."""
        return {**self.push(version), **self.canary(version)}

    def push(self, version: int) -> dict[str, float]:
        """Learner -> engines over ``sync.transport`` (``WEIGHT_PUSH``). A sleeping engine needs its weights awake
        for this, and every tag awake before anything generates (``canary``)."""
        push = WEIGHT_PUSH[self.cfg.weight_transport()]
        out = push(self.learner, self.engines, version, int(self.cfg.sync.bucket_mb * 2**20))
        self.engine_version = version
        return out

    def canary(self, version: int) -> dict[str, float]:
        """The canary's metrics after a sync (nothing when ``sync.canary`` is off); raises ``CanaryError``."""
        if not self.cfg.sync.canary or self.probe is None:
            return {}
        return self.check_canary(version)

    def check_canary(self, version: int) -> dict[str, float]:
        """Engine vs learner log-probs on the fixed probe, per engine: the mean and the largest absolute difference,
        each against its bound (``SyncConfig.canary_bounds``, per dtype by default). Generates on every engine, so
        every engine must be fully awake."""
        import ray

        want = self.learner.call("probe_logprobs", self.probe)
        mean_bound, max_bound = self.cfg.sync.canary_bounds(self.cfg.canary_dtype())
        worst_mean = worst_max = 0.0
        for i, got in enumerate(ray.get([e.score_tokens.remote(self.probe) for e in self.engines])):
            mean, largest = canary_gap(want, got)
            worst_mean, worst_max = max(worst_mean, mean), max(worst_max, largest)
            if mean > mean_bound or largest > max_bound:
                raise CanaryError(
                    f"weight sync canary failed on engine {i} at version {version}: engine and learner log-probs on "
                    f"the probe differ by {mean:.3g} on average (bound {mean_bound:.3g}) and {largest:.3g} at most "
                    f"(bound {max_bound:.3g}; sync.canary_mean_abs_diff / sync.canary_max_abs_diff, defaults for "
                    f"{self.cfg.canary_dtype()}). The engine is not serving the learner's weights (or runs another "
                    "dtype or kernel).")
        return {"sync/canary_mean_abs_diff": worst_mean, "sync/canary_max_abs_diff": worst_max}

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out accuracy of the current policy (greedy by default)."""
        from rl.metrics import pass_at_k

        if self.cfg.multiturn.env is not None:
            return self.evaluate_episodes(step)
        if self.cfg.dccot is not None:
            return self.evaluate_dccot(step)

        ec = self.cfg.eval
        n = ec.num_samples
        t0 = time.perf_counter()
        groups = self.generate(self.eval_items, n, step=-1 - step, temperature=ec.temperature,
                               max_tokens=ec.max_response_tokens or self.cfg.rollout.max_response_tokens)
        results = self.score(self.eval_items, groups)
        self.reward_pool.metrics(reset=True)  # eval grading must not count in the next training step's reward metrics
        correct = np.array([r.correct for r in results], dtype=float).reshape(len(self.eval_items), n)
        out = {
            "eval/accuracy": float(correct.mean()),
            "eval/num_problems": float(len(self.eval_items)),
            "eval/response_len_mean": float(np.mean([len(r.response_token_ids) for g in groups for r in g])),
            "perf/eval_s": time.perf_counter() - t0,
        }
        if n > 1:
            out[f"eval/pass@{n}"] = float(np.mean([pass_at_k(n, int(c), n) for c in correct.sum(1)]))
        if self.benchmarks:
            from rl.eval_stats import evaluate_benchmarks

            max_tokens = ec.max_response_tokens or self.cfg.rollout.max_response_tokens
            bench = evaluate_benchmarks(
                lambda items, k: self.generate(items, k, step=-1 - step, temperature=ec.temperature,
                                               max_tokens=max_tokens),
                self.score, self.benchmarks, n,
            )
            self.reward_pool.metrics(reset=True)
            out["perf/eval_s"] += bench.pop("perf/eval_s")
            out.update(bench)
        return out

    def shape_rewards(self, groups: list[list[Rollout]], results: list[RewardResult]) -> tuple[list[RewardResult], dict]:
        """DAPO's soft overlong punishment, added to each graded score (``shaping.overlong_*``)."""
        sc = self.cfg.shaping
        if not sc.overlong_buffer_len:
            return results, {}
        max_len = self.cfg.rollout.max_response_tokens
        flat = [r for g in groups for r in g]
        penalties = [overlong_penalty(len(r.response_token_ids), max_len, sc.overlong_buffer_len,
                                      sc.overlong_penalty_factor) for r in flat]
        shaped = [replace(res, score=res.score + p) for res, p in zip(results, penalties)]
        return shaped, {"shaping/overlong_penalty_mean": float(np.mean(penalties)),
                        "shaping/overlong_frac": float(np.mean([p < 0 for p in penalties]))}

    def rollout_batch(self, step: int) -> tuple[list[PromptItem], list[list[Rollout]], list[RewardResult], dict]:
        """Prompts, their response groups and graded (shaped) results for one step.

        Without dynamic sampling: one round of ``prompts_per_step`` prompts. With it (DAPO): rounds of
        ``prompts_per_round`` prompts; groups whose filter metric is constant are dropped, rounds continue
        until ``prompts_per_step`` groups are kept or ``max_rounds`` is reached, and the batch is cut to exactly
        ``prompts_per_step`` groups. The GDRO controller (when on) sets the sample count of each prompt and
        sees every graded group, kept or not.
        """
        cfg = self.cfg
        ds = cfg.rollout.dynamic_sampling
        target = cfg.rollout.prompts_per_step
        per_round = (ds.prompts_per_round or target) if ds.enabled else target
        kept: list[tuple[PromptItem, list[Rollout], list[RewardResult]]] = []
        stats = {"perf/rollout_s": 0.0, "perf/reward_s": 0.0, "rollout/tokens": 0.0}
        shaping: dict[str, list[float]] = {}
        generated = rounds = dropped = 0
        seen: list[tuple[str, list[bool]]] = []  # every graded group of this step, kept or not (for GDRO)
        for rnd in range(ds.max_rounds if ds.enabled else 1):
            rounds += 1
            items = self.sampler.next(per_round)
            counts = (self.gdro.n_per_prompt([it.id for it in items]) if self.gdro is not None
                      else cfg.rollout.num_samples_per_prompt)
            t0 = time.perf_counter()
            groups = self.generate(items, counts, step, cfg.rollout.temperature, cfg.rollout.max_response_tokens,
                                   seed_offset=rnd * per_round)
            stats["perf/rollout_s"] += time.perf_counter() - t0
            stats["rollout/tokens"] += sum(len(r.response_token_ids) for g in groups for r in g)
            t0 = time.perf_counter()
            results, shape_stats = self.shape_rewards(groups, self.score(items, groups))
            stats["perf/reward_s"] += time.perf_counter() - t0
            for key, value in shape_stats.items():
                shaping.setdefault(key, []).append(value)
            graded = _split(results, [len(g) for g in groups])
            seen.extend((it.id, [r.correct for r in rs]) for it, rs in zip(items, graded))
            generated += len(items)
            for it, g, rs in zip(items, groups, graded):
                values = [float(r.correct) for r in rs] if ds.metric == "accuracy" else [r.score for r in rs]
                if not ds.enabled or keep_group(values):
                    kept.append((it, g, rs))
                else:
                    dropped += 1
            if len(kept) >= target:
                break
        kept = kept[:target]
        stats.update({key: float(np.mean(v)) for key, v in shaping.items()})
        if ds.enabled:
            stats.update(_dapo_metrics(rounds, generated, dropped, len(kept), target))
        items = [k[0] for k in kept]
        groups = [k[1] for k in kept]
        results = [r for k in kept for r in k[2]]
        self._seen_groups = seen
        return items, groups, results, stats

    # ------------------------------------------------------------------ multi-turn (GiGPO)
    def _env_generate_fn(self, temperature: float, max_tokens: int):
        """``generate_fn(prompts, seeds) -> one rollout each`` over the engine actors, for ``run_episodes``."""
        from rollout.engine import GenerationRequest, SamplingSettings

        settings = SamplingSettings(temperature=temperature, top_p=self.cfg.rollout.top_p, max_tokens=max_tokens)

        def generate_fn(prompts: list[str], seeds: list[int]) -> list[Rollout]:
            reqs = [GenerationRequest(f"turn-{i}", p, 1, seed) for i, (p, seed) in enumerate(zip(prompts, seeds))]
            return [group[0] for group in self._dispatch(reqs, settings)]

        return generate_fn

    def play_episodes(self, group_seeds: list[int], group_size: int, temperature: float, prefix: str):
        from rollout.env import make_env
        from rollout.multiturn import run_episodes

        mt = self.cfg.multiturn
        gen = self._env_generate_fn(temperature, self.cfg.rollout.max_response_tokens)
        return run_episodes(gen, lambda: make_env(mt.env, **mt.env_options), group_seeds, group_size, mt.max_turns,
                            base_seed=self.cfg.run.seed, group_id_prefix=prefix)

    def episode_batch(self, step: int):
        """Play ``groups_per_step`` x ``group_size`` episodes, GiGPO advantages, one sample per turn."""
        from rollout.multiturn import episode_advantages, episode_metrics, to_train_samples

        mt = self.cfg.multiturn
        t0 = time.perf_counter()
        seeds = [request_seed(self.cfg.run.seed, step, i) for i in range(mt.groups_per_step)]
        episodes = self.play_episodes(seeds, mt.group_size, self.cfg.rollout.temperature, prefix=f"s{step}-g")
        t_gen = time.perf_counter() - t0
        result = episode_advantages(episodes, mt.gigpo)
        samples = to_train_samples(episodes, result.advantages)
        lengths = np.array([len(s.response_token_ids) for s in samples])
        metrics = {
            **episode_metrics(episodes),
            **result.metrics,
            "reward/mean": float(np.mean([ep.episode_return for ep in episodes])),
            "reward/accuracy": float(np.mean([any(st.info.get("success") for st in ep.steps) for ep in episodes])),
            "rollout/response_len_mean": float(lengths.mean()) if len(lengths) else 0.0,
            "rollout/advantage_abs_mean": float(np.mean(np.abs(result.advantages))) if samples else 0.0,
            "perf/rollout_s": t_gen,
            "perf/reward_s": 0.0,
            "rollout/tokens": float(lengths.sum()),
        }
        self._last_episodes = episodes
        return samples, metrics, [], [], []

    def evaluate_episodes(self, step: int) -> dict[str, float]:
        """Success rate on held-out start states (seeds >= 2**31, never drawn for training)."""
        from rollout.multiturn import episode_metrics

        ec, mt = self.cfg.eval, self.cfg.multiturn
        t0 = time.perf_counter()
        seeds = [2**31 + i for i in range(mt.eval_groups)]
        episodes = self.play_episodes(seeds, ec.num_samples, ec.temperature, prefix="eval-g")
        m = episode_metrics(episodes)
        return {
            "eval/accuracy": m["rollout/episode_success_frac"],
            "eval/episode_return_mean": m["rollout/episode_return_mean"],
            "eval/episode_steps_mean": m["rollout/episode_steps_mean"],
            "eval/invalid_action_frac": m["rollout/invalid_action_frac"],
            "perf/eval_s": time.perf_counter() - t0,
        }

    # ------------------------------------------------------------------ DC-CoT (director + parallel workers)
    def dccot_trajectories(self, items: list[PromptItem], n: int, step: int, temperature: float,
                           seed_offset: int = 0):
        """``n`` DC-CoT trajectories per item (item-major), seeded from (run seed, step, slot)."""
        from rollout.dccot import TrajectoryRequest, run_dccot

        tok = self.tokenizer
        reqs = [
            TrajectoryRequest(it.id, tok(it.prompt, add_special_tokens=False)["input_ids"],
                              request_seed(self.cfg.run.seed, step, seed_offset + i * n + j))
            for i, it in enumerate(items) for j in range(n)
        ]
        from rollout.engine import SamplingSettings, engines_generate_fn

        settings = SamplingSettings(temperature=temperature, top_p=self.cfg.rollout.top_p)
        return run_dccot(
            engines_generate_fn(self.engines, settings),
            lambda text: tok(text, add_special_tokens=False)["input_ids"],
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            reqs, self.cfg.dccot,
        )

    def score_trajectories(self, items: list[PromptItem], trajs, n: int) -> list[RewardResult]:
        """Grade each trajectory's response text; the rewards see its path lengths in the metadata."""
        from rewards import reward_request

        reqs = [reward_request(it, t, j) for i, it in enumerate(items) for j, t in enumerate(trajs[i * n : (i + 1) * n])]
        return self.reward_pool.score(reqs)

    def dccot_format_valid(self, text: str) -> bool:
        from rl.dccot import response_format_valid

        return response_format_valid(text, self.cfg.dccot.workers_per_block, self.cfg.dccot.max_spawn_blocks)

    def dccot_batch(self, step: int):
        """DC-CoT rollouts (with dynamic sampling when on), one reward and one advantage per trajectory,
        broadcast to its director thread and every worker (``rollout.dccot.to_train_samples``)."""
        import torch

        from rollout.dccot import to_train_samples, trajectory_metrics

        cfg = self.cfg
        ds = cfg.rollout.dynamic_sampling
        n = cfg.rollout.num_samples_per_prompt
        target = cfg.rollout.prompts_per_step
        per_round = (ds.prompts_per_round or target) if ds.enabled else target
        kept: list[tuple[PromptItem, list, list[RewardResult], list[bool]]] = []
        t_gen = t_reward = 0.0
        rounds = dropped = generated = 0
        for rnd in range(ds.max_rounds if ds.enabled else 1):
            rounds += 1
            items = self.sampler.next(per_round)
            t0 = time.perf_counter()
            trajs = self.dccot_trajectories(items, n, step, cfg.rollout.temperature, seed_offset=rnd * per_round * n)
            t_gen += time.perf_counter() - t0
            t0 = time.perf_counter()
            results = self.score_trajectories(items, trajs, n)
            t_reward += time.perf_counter() - t0
            generated += len(items)
            for i, it in enumerate(items):
                tg, rs = trajs[i * n : (i + 1) * n], results[i * n : (i + 1) * n]
                fmt = [self.dccot_format_valid(t.response_text) for t in tg]
                if ds.metric == "correct_and_format":
                    keep = any(r.correct and f for r, f in zip(rs, fmt))
                else:
                    keep = keep_group([float(r.correct) for r in rs] if ds.metric == "accuracy" else [r.score for r in rs])
                if not ds.enabled or keep:
                    kept.append((it, tg, rs, fmt))
                else:
                    dropped += 1
            if len(kept) >= target:
                break
        kept = kept[:target]
        trajs = [t for k in kept for t in k[1]]
        results = [r for k in kept for r in k[2]]
        fmt = [f for k in kept for f in k[3]]
        metrics: dict[str, float] = {"perf/rollout_s": t_gen, "perf/reward_s": t_reward}
        if ds.enabled:
            metrics.update(_dapo_metrics(rounds, generated, dropped, len(kept), target))
        self._last_dccot = (kept, trajs, results)
        if not trajs:
            metrics["rollout/tokens"] = 0.0
            return [], metrics
        rewards = torch.tensor([r.score for r in results], dtype=torch.float64)
        group_ids = [t.prompt_id for t in trajs]
        adv = self.estimator(AdvantageInput(rewards=rewards, group_ids=group_ids), cfg.algorithm)
        samples = to_train_samples(trajs, adv.tolist())
        lengths = [t.path_lengths for t in trajs]
        metrics.update({
            **trajectory_metrics(trajs),
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std(unbiased=False)),
            "reward/accuracy": float(np.mean([r.correct for r in results])),
            "reward/format_valid_frac": float(np.mean(fmt)),
            "reward/correct_and_format_frac": float(np.mean([r.correct and f for r, f in zip(results, fmt)])),
            "rollout/num_samples": float(len(samples)),
            "rollout/num_trajectories": float(len(trajs)),
            "rollout/response_len_mean": float(np.mean([x.total_tokens for x in lengths])),
            "rollout/advantage_abs_mean": float(adv.abs().mean()),
            "rollout/tokens": float(sum(x.total_tokens for x in lengths)),
        })
        return samples, metrics

    def evaluate_dccot(self, step: int) -> dict[str, float]:
        """Held-out accuracy of DC-CoT trajectories, with their longest path and total tokens."""
        from rl.metrics import pass_at_k

        ec = self.cfg.eval
        n = ec.num_samples
        t0 = time.perf_counter()
        trajs = self.dccot_trajectories(self.eval_items, n, step=-1 - step, temperature=ec.temperature)
        results = self.score_trajectories(self.eval_items, trajs, n)
        self.reward_pool.metrics(reset=True)
        correct = np.array([r.correct for r in results], dtype=float).reshape(len(self.eval_items), n)
        lengths = [t.path_lengths for t in trajs]
        out = {
            "eval/accuracy": float(correct.mean()),
            "eval/num_problems": float(len(self.eval_items)),
            "eval/format_valid_frac": float(np.mean([self.dccot_format_valid(t.response_text) for t in trajs])),
            "eval/longest_path_mean": float(np.mean([x.longest_path_tokens for x in lengths])),
            "eval/total_tokens_mean": float(np.mean([x.total_tokens for x in lengths])),
            "eval/response_len_mean": float(np.mean([x.total_tokens for x in lengths])),
            "perf/eval_s": time.perf_counter() - t0,
        }
        if n > 1:
            out[f"eval/pass@{n}"] = float(np.mean([pass_at_k(n, int(c), n) for c in correct.sum(1)]))
        return out

    def build_samples(self, items, groups, results) -> tuple[list[TrainSample], dict[str, float]]:
        """The learner's samples: rewards (minus the KL penalty with ``kl_in=reward``) -> advantage estimator ->
        advantage shaping -> Prompt-GDRO weights."""
        import torch

        flat = [r for g in groups for r in g]
        rewards = np.array([r.score for r in results], dtype=np.float64)
        group_ids = [g[0].prompt_id for g in groups for _ in g]
        stats: dict[str, float] = {}
        self._raw_advantages: dict[str, list[float]] = {}  # prompt id -> unweighted advantages (for GDRO)
        if not flat:
            return [], {"rollout/num_samples": 0.0}
        algo = self.cfg.algorithm
        mask_truncated = self.cfg.shaping.mask_truncated
        masks = [[0] * len(r.response_token_ids) if mask_truncated and r.finish_reason == "length" else None
                 for r in flat]
        if algo.kl_coef > 0 and algo.kl_in == "reward":

            pre = [TrainSample(r.prompt_token_ids, r.response_token_ids, r.logprobs, 0.0, gid, loss_mask=m)
                   for r, gid, m in zip(flat, group_ids, masks)]
            penalties = np.array(self.learner.call("kl_reward_penalties", pre))
            stats["kl/reward_penalty_mean"] = float(penalties.mean())
        else:
            penalties = np.zeros_like(rewards)
        train_rewards = torch.tensor(rewards - penalties)
        adv = self.estimator(AdvantageInput(rewards=train_rewards, group_ids=group_ids), algo)
        for gid, a in zip(group_ids, adv.tolist()):
            self._raw_advantages.setdefault(gid, []).append(a)
        if algo.advantage_shaping != "none":
            adv, ds_stats = shape_advantages(
                adv,
                torch.tensor([r.correct for r in results], dtype=torch.bool),
                torch.tensor([float(sum(r.logprobs)) for r in flat], dtype=adv.dtype),
                torch.tensor([len(r.response_token_ids) for r in flat], dtype=adv.dtype),
                algo,
            )
            stats.update(ds_stats)
        if self.gdro is not None:
            weights = self.gdro.sample_weights(group_ids)  # one id per sample: mean 1 over samples
            adv = adv * torch.tensor(weights, dtype=adv.dtype)
        samples = [
            TrainSample(r.prompt_token_ids, r.response_token_ids, r.logprobs, float(a), gid, loss_mask=m)
            for r, a, gid, m in zip(flat, adv.tolist(), group_ids, masks)
        ]
        by_group = _split(list(rewards), [len(g) for g in groups])
        lengths = np.array([len(r.response_token_ids) for r in flat])
        stats.update({
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "reward/accuracy": float(np.mean([r.correct for r in results])),
            "rollout/num_samples": float(len(flat)),
            "rollout/samples_per_prompt_min": float(min(len(g) for g in groups)),
            "rollout/samples_per_prompt_max": float(max(len(g) for g in groups)),
            "rollout/response_len_mean": float(lengths.mean()),
            "rollout/response_len_max": float(lengths.max()),
            "rollout/truncated_frac": float(np.mean([r.finish_reason == "length" for r in flat])),
            "rollout/groups_all_equal_frac": float(np.mean([max(g) == min(g) for g in by_group])),
            "rollout/advantage_abs_mean": float(np.abs(adv.numpy()).mean()),
        })
        return samples, stats

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:

        tmp = self.ckpt.begin(step)
        self.learner.call("save", str(tmp))
        _copy_tokenizer_files(self.model_path, tmp / "model")  # so <checkpoint>/model is a complete model.path
        sampler_state = self._sampler_marks.get(step + 1) or self.sampler.state_dict()
        state = {"step": step, "sampler": sampler_state, "weight_version": step}
        if self.spec is not None:
            state["spec_decode"] = self.spec.state_dict()
        if self.gdro is not None:
            state["gdro"] = self.gdro.state_dict()
        path = self.ckpt.commit(tmp, step, state)
        return path

    def _load_latest(self) -> None:

        latest = self.ckpt.latest()
        if latest is None:
            print(f"[rl] --resume: no checkpoint in {self.ckpt.root}; starting from step 0", flush=True)
            return
        state = json.loads((latest / "driver_state.json").read_text())
        self.learner.call("load", str(latest))
        self.sampler.load_state_dict(state["sampler"])
        if self.gdro is not None:
            if "gdro" not in state:
                raise ValueError(f"{latest} has no GDRO controller state, but gdro is enabled in this config")
            self.gdro.load_state_dict(state["gdro"])
        if self.spec is not None and "spec_decode" in state:
            self.spec.load_state_dict(state["spec_decode"])
        self.start_step = self._learner_step = int(state["step"])
        self.logger.truncate_after(self.start_step)
        print(f"[rl] resumed from {latest} at step {self.start_step}", flush=True)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        from ray.exceptions import RayActorError

        cfg = self.cfg
        self.setup()
        # A fixed probe for the canary: the greedy answer to the first eval prompt, fixed for the whole run.
        probe_groups = self.generate(self.eval_items[:2], 1, step=0, temperature=1.0, max_tokens=16)
        self.probe = [(g[0].prompt_token_ids, g[0].response_token_ids or [g[0].prompt_token_ids[-1]]) for g in probe_groups]
        first = self.sync_weights(version=self.start_step)
        summary: dict = {"run_dir": str(self.run_dir)}
        progress = Progress(cfg.run.num_steps, self.start_step, cfg.run.progress)
        step = self.start_step
        old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in old_handlers:
            signal.signal(sig, self._on_stop_signal)
        try:
            if self.start_step == 0:
                ev = self.evaluate(0)
                self.logger.log(0, {**ev, **first, **getattr(self, "_drafter_start_metrics", {})})
                progress.message(f"[rl] step 0: held-out accuracy {ev['eval/accuracy']:.3f}")
                summary["eval_before"] = ev["eval/accuracy"]
            while step < cfg.run.num_steps:
                if self._stop_requested:
                    raise KeyboardInterrupt
                metrics = self.train_one_step(step + 1)
                step += 1
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.run.num_steps:
                    metrics.update(self.evaluate(step))
                if step == cfg.run.num_steps:
                    metrics.update(self.evaluate(step))
                    summary["eval_after"] = metrics["eval/accuracy"]
                self.logger.log(step, metrics)
                progress.update(step, metrics)
                if (cfg.run.save_every_steps and step % cfg.run.save_every_steps == 0) or step == cfg.run.num_steps:
                    self.save_checkpoint(step)
        except KeyboardInterrupt:
            progress.close()
            print(f"\n[rl] interrupted: {self._save_after_failure(step)}; continue with --resume", flush=True)
            raise
        except RewardError as exc:
            progress.close()
            raise RewardError(f"{exc}\n{self._save_after_failure(step)}: fix the reward, then continue with "
                              "--resume.") from None
        except (RayActorError, WeightSyncError) as exc:
            progress.close()
            dead = exc.actor_error if isinstance(exc, WeightSyncError) else exc
            if dead is None:
                raise
            who, why = self._dead_actor(dead)
            where = f" (in the {exc.what})" if isinstance(exc, WeightSyncError) else ""
            saved = self._save_after_failure(step, learner_died=who.startswith("learner"))
            raise ActorDiedError(f"{who} died during step {step + 1}: {why}{where}\n{saved}; continue with "
                                 "--resume.") from None
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            progress.close()
        summary["final_step"] = step
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _on_stop_signal(self, signum, frame) -> None:
        """SIGTERM or a first Ctrl-C: stop after the current step (its checkpoint then holds exactly its update). A
        second Ctrl-C stops at once."""
        if signum == signal.SIGINT:
            if self._stop_requested:
                raise KeyboardInterrupt
            print("\n[rl] Ctrl-C: stopping after this step (Ctrl-C again to stop now)", flush=True)
        self._stop_requested = True

    def _save_after_failure(self, step: int, learner_died: bool = False) -> str:
        """Save what a stopped run can: step ``step`` when the learner is alive, holds exactly that step's update,
        and the step is not the one resumed from; otherwise the newest complete checkpoint stays the one to resume
        from. Says which, for the user."""
        from ray.exceptions import RayError

        if learner_died:
            reason = "the learner is gone, so nothing newer can be saved"
        elif self._learner_step != step:
            reason = f"step {step + 1}'s update had started, so the learner no longer holds step {step}"
        elif (saved := self.ckpt.root / f"step_{step:06d}") in self.ckpt.list():
            return f"saved step {step} to {saved}"  # already, by the regular save (a re-save would replace it)
        elif step > self.start_step or step == 0:
            try:
                return f"saved step {step} to {self.save_checkpoint(step)}"
            except RayError as exc:  # e.g. the learner died while saving
                reason = f"saving step {step} failed ({type(exc).__name__})"
        else:
            reason = f"nothing new since step {step}"
        latest = self.ckpt.latest()
        return f"{reason}; the last checkpoint is {latest}" if latest else f"{reason}; no checkpoint yet"

    def _dead_actor(self, exc) -> tuple[str, str]:
        """(which actor: ``engine i`` / ``learner rank k``, why it died: Ray's account, on one line) of a
        ``RayActorError``."""
        from ray.exceptions import ActorDiedError as ActorDied

        names = {**{e._actor_id.hex(): f"engine {i}" for i, e in enumerate(self.engines)},
                 **{a._actor_id.hex(): f"learner rank {k}" for k, a in enumerate(self.learner.actors)}}
        who = names.get(exc.actor_id, f"actor {exc.actor_id}")
        lines = [ln.strip() for ln in str(exc.error_msg).splitlines() if ln.strip()]
        why = "; ".join(ln for ln in lines if ln != ActorDied.BASE_ERROR_MSG
                        and not ln.startswith(("class_name:", "actor_id:", "namespace:")))
        return who, why or "Ray gave no reason"

    def prepare_batch(self, step: int) -> dict:
        """Step ``step``'s rollouts turned into learner samples, with their metrics (the reward pool's counters
        included), the engine weight version that generated them, and what sample logging needs."""
        cfg = self.cfg
        self._sampler_marks = {s: v for s, v in self._sampler_marks.items() if s >= step - 1}
        self._sampler_marks[step] = self.sampler.state_dict()
        gen_started = self.spec.begin_generation() if self.spec is not None else None
        gdro_feed = None
        if cfg.multiturn.env is not None:
            samples, metrics, *_ = self.episode_batch(step)
            log = ("multiturn", self._last_episodes)
        elif cfg.dccot is not None:
            samples, metrics = self.dccot_batch(step)
            log = ("dccot", self._last_dccot)
        else:
            items, groups, results, roll_stats = self.rollout_batch(step)
            samples, metrics = self.build_samples(items, groups, results)
            metrics.update(roll_stats)
            log = ("single", (items, groups, results))
            if self.gdro is not None:
                # The controller's feedback for this batch travels with it (async mode prepares the next batch
                # before this one's update), as do the decisions it made for it.
                gdro_feed = (self._seen_groups, self._raw_advantages, self.gdro.decision_metrics())
        # The pool's own counters (timeouts, parse failures...) never overwrite the step's metrics.
        metrics = {**self.reward_pool.metrics(reset=True), **metrics}
        interval = None
        if self.spec is not None:
            spec_metrics = self.spec.end_generation(gen_started)
            interval = spec_metrics.pop("_generation_interval")
            metrics.update(spec_metrics)
        return {"samples": samples, "metrics": metrics, "log": log, "engine_version": self.engine_version,
                "generation_interval": interval, "gdro_feed": gdro_feed}

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return step == self.cfg.run.num_steps or bool(every and step % every == 0)

    def _engines_call(self, method: str, *args) -> float:
        import ray

        return float(max(ray.get([getattr(e, method).remote(*args) for e in self.engines]), default=0.0))

    def train_one_step(self, step: int) -> dict[str, float]:
        """Rollouts (or the batch generated during the previous step, in async mode) -> learner update -> weight
        sync. Async mode generates step+1's batch while the learner trains, if its policy lag (the learner's
        version it trains on minus the engines' version that generates it) stays within
        ``async_mode.max_off_policy_steps``; the sync after a step is skipped while the next batch's lag allows."""
        import ray

        cfg = self.cfg
        t_step = time.perf_counter()
        drafter_refs = drafter_interval = None
        batch = self._pending.pop(step, None)
        if batch is None:
            # The learner would wait for these rollouts: the drafter trains meanwhile (queued before train_step).
            drafter_refs = self.spec.submit_training() if self.spec is not None else None
            batch = self.prepare_batch(step)
            drafter_interval = batch["generation_interval"]
        samples, metrics = batch["samples"], batch["metrics"]
        self.check_reward_errors(step, metrics, batch["log"])
        colocated = cfg.placement.mode == "colocated"
        if colocated:
            metrics["perf/engine_sleep_s"] = self._engines_call("sleep", cfg.placement.engine_sleep_level)
        t_learn = time.perf_counter()
        if samples:
            self._learner_step = step
        refs = self.learner.submit("train_step", samples) if samples else None
        if not samples:
            print(f"[rl] step {step}: no group survived dynamic sampling; no update this step", flush=True)
        lag_bound = cfg.async_mode.max_off_policy_steps
        if cfg.async_mode.enabled:
            metrics["async/overlap_generate_s"] = 0.0
            if step < cfg.run.num_steps and step - self.engine_version <= lag_bound:
                queued_now = self.spec is not None and drafter_refs is None
                if queued_now:  # queued behind train_step, during the next batch's generation
                    drafter_refs = self.spec.submit_training()
                t0 = time.perf_counter()
                self._pending[step + 1] = self.prepare_batch(step + 1)
                if queued_now:
                    drafter_interval = self._pending[step + 1]["generation_interval"]
                metrics["async/overlap_generate_s"] = time.perf_counter() - t0
        if refs is not None:
            metrics.update(ray.get(refs)[0])
        if self.spec is not None:
            metrics.update(self.spec.collect_training(drafter_refs, drafter_interval))
        metrics["perf/learner_wall_s"] = time.perf_counter() - t_learn
        # Colocated engines sleep while the learner trains. Their scheduler stays paused until every tag is awake
        # (vLLM), so the order is: weights awake, push, KV cache awake, and only then anything that generates.
        if colocated:
            metrics["perf/engine_wake_s"] = self._engines_call("wake_up", ["weights"])
        synced = not cfg.async_mode.enabled or self.engine_version < step + 1 - lag_bound or self._eval_due(step)
        t_sync, sync_wait = time.perf_counter(), 0.0
        if synced:
            metrics.update(self.push(version=step))
            if self.spec is not None:  # the drafter goes with the target weights it was trained against
                metrics.update(self.spec.publish(step))
            sync_wait = time.perf_counter() - t_sync
        if colocated:
            metrics["perf/engine_wake_s"] += self._engines_call("wake_up", ["kv_cache"])
        if synced:
            t_sync = time.perf_counter()
            metrics.update(self.canary(version=step))
            sync_wait += time.perf_counter() - t_sync
        # what the step waited for: the push, the drafter's publish and the canary (nothing overlaps them: the
        # engines generate the next batch with the new weights, the learner's next update changes them); 0 for an
        # async step whose sync was skipped
        metrics["perf/sync_wait_s"] = sync_wait
        metrics["async/policy_lag"] = float(step - 1 - batch["engine_version"])
        if batch["gdro_feed"] is not None:
            seen, raw_adv, decisions = batch["gdro_feed"]
            self.gdro.update([pid for pid, _ in seen], [c for _, c in seen],
                             advantages=[raw_adv.get(pid, [0.0] * len(c)) for pid, c in seen])
            metrics.update({**self.gdro.state_metrics(), **decisions})
        n_tokens = metrics.pop("rollout/tokens")
        metrics.update({
            "perf/rollout_tokens_per_s": n_tokens / max(metrics["perf/rollout_s"], 1e-9),
            "perf/step_s": time.perf_counter() - t_step,
        })
        if "rollout/spec/long_tail_s" in metrics:
            metrics["rollout/spec/long_tail_step_frac"] = metrics["rollout/spec/long_tail_s"] / metrics["perf/step_s"]
        self._log_samples(step, batch["log"])
        return metrics

    def check_reward_errors(self, step: int, metrics: dict[str, float], log) -> None:
        """Warn (at most once per reward every ``_REWARD_WARN_EVERY_STEPS`` steps) about each reward that errored on
        some of this step's responses, with its first error text; raise ``RewardError`` (after logging the step's
        samples) when one errored on at least ``reward_pool.max_error_rate`` of them."""
        texts = self.reward_pool.take_first_errors()
        graded = int(metrics.get("reward/num_graded", 0))
        warned = self._reward_error_warned
        failing = []
        for name in self.reward_pool.names:
            errors = int(metrics.get(f"reward/{name}/num_errors", 0))
            if not errors:
                continue
            text = texts.get(name, "(no error text)")
            rate = metrics[f"reward/{name}/error_rate"]
            if rate >= self.cfg.reward_pool.max_error_rate:
                failing.append(f"reward {name!r} errored on {errors}/{graded} responses of step {step} "
                               f"(reward_pool.max_error_rate={self.cfg.reward_pool.max_error_rate:g}); first error: {text}")
            elif step - warned.get(name, -_REWARD_WARN_EVERY_STEPS) >= _REWARD_WARN_EVERY_STEPS:
                warned[name] = step
                print(f"[rl] warning: step {step}: reward {name!r} errored on {errors}/{graded} responses (scored 0); "
                      f"first error: {text} (next warning for it in >= {_REWARD_WARN_EVERY_STEPS} steps; every "
                      f"step's count is in reward/{name}/num_errors, the texts in samples.jsonl)", flush=True)
        if failing:
            self._log_samples(step, log)
            raise RewardError("; ".join(failing))

    def _log_samples(self, step: int, log) -> None:
        k = self.cfg.run.log_samples_per_step
        kind, data = log
        if not k:
            return
        if kind == "dccot":
            kept, trajs, results = data
            items_by_id = {it.id: it for it, *_ in kept}
            self.logger.log_samples(step, [
                {"prompt_id": t.prompt_id, "prompt": items_by_id[t.prompt_id].prompt, "response": t.response_text,
                 "answer": items_by_id[t.prompt_id].answer, "reward": res.score, "correct": res.correct,
                 "status": res.status, "error": res.error, "components": res.components, "end_reason": t.end_reason,
                 **t.reward_metadata()}
                for t, res in list(zip(trajs, results))[:k]
            ])
        elif kind == "multiturn":
            turns = [(ep, st) for ep in data for st in ep.steps][:k]
            self.logger.log_samples(step, [
                {"trajectory_id": ep.trajectory_id, "turn": st.step_index, "prompt": st.prompt,
                 "response": st.action_text, "reward": st.reward, "state": st.state_key, "info": st.info}
                for ep, st in turns
            ])
        else:
            items, groups, results = data
            flat = [(it, r) for it, g in zip(items, groups) for r in g]
            picked = [(it, r, results[i]) for i, (it, r) in enumerate(flat[:k])]
            self.logger.log_samples(step, [
                {"prompt_id": it.id, "prompt": it.prompt, "response": r.response_text, "answer": it.answer,
                 "reward": res.score, "correct": res.correct, "extracted": res.extracted, "status": res.status,
                 "error": res.error, "components": res.components, "num_response_tokens": r.num_response_tokens,
                 "finish_reason": r.finish_reason}
                for it, r, res in picked
            ])

    def close(self) -> None:
        import ray

        for closer in (getattr(self, "logger", None), getattr(self, "reward_pool", None)):
            if closer is not None:
                closer.close()
        if ray.is_initialized() and not self.cfg.ray.address:
            ray.shutdown()


def train(cfg: Config, resume: bool = False, allow_config_change: bool = False) -> dict:
    trainer = Trainer(cfg, resume=resume, allow_config_change=allow_config_change)
    try:
        return trainer.run()
    finally:
        trainer.close()
