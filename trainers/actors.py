"""Starting the run's actors: the rollout engines, then the learner ranks, each in its placement group bundle
(``rl.placement``) with its own environment, then the weight transfer between them."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rl.config import Config
from rl.tracking import CheckpointManager
from trainers.sync import ENGINE_WEIGHT_TRANSFER, LearnerGroup, init_weight_transfer, push_drafter_transfer

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



def start_actors(cfg: Config, model_path: str, run_dir: Path, resume: bool):
    """Reserve the placement groups, start the engines and the learner ranks, then the weight transfer. Colocated,
    the learners start once the engines are up (vLLM sizes its KV cache from the device's free memory, so no learner
    may be loading beside it); disaggregated, both start at once. Returns (engines, learner group, the drafter's
    controller or None)."""
    import ray

    from rl import placement
    from rollout.engine import Engine
    from trainers.distributed import free_address
    from trainers.learner import learner_class
    from trainers.settings import LearnerSettings

    r, lc, pc = cfg.rollout, cfg.learner, cfg.placement
    colocated = pc.mode == "colocated"
    placed = placement.reserve(cfg)
    spec = speculative_config = None
    if cfg.drafter.mode != "off":
        from trainers.spec_decode import DrafterController

        resume_from = CheckpointManager(run_dir, cfg.run.keep_last_checkpoints).latest() if resume else None
        spec = DrafterController(cfg.drafter, run_dir, model_path, cfg.run.seed, resume_from)
        speculative_config = spec.speculative_config()
    t0 = time.perf_counter()
    engines = []
    for i in range(r.num_engines):
        engines.append(ray.remote(Engine).options(**engine_actor_options(cfg, placed, i)).remote(
            model_path, dtype=r.dtype or cfg.model.dtype, seed=cfg.run.seed + i, max_model_len=r.max_model_len,
            gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
            engine_core=r.engine_core, tensor_parallel_size=r.tensor_parallel_size,
            enable_sleep_mode=colocated and pc.engine_sleep_level > 0, speculative_config=speculative_config,
            model_runner=r.model_runner, weight_transfer=ENGINE_WEIGHT_TRANSFER[cfg.weight_transport()],
            max_lora_rank=cfg.model.lora.engine_max_rank() if cfg.model.lora is not None else None,
            adapter_dir=str(run_dir / "adapters" / f"engine{i}") if cfg.model.lora is not None else None,
        ))
    if colocated:
        # vLLM sizes its KV cache from the device's free memory, so no learner may be loading beside it
        ray.get([e.ping.remote() for e in engines])
    t1 = time.perf_counter()
    # The rendezvous port is picked on rank 0's node just before the ranks bind it (a port free now may not be
    # free minutes later).
    master = ray.get(ray.remote(free_address).options(**placement.rank0_options(placed)).remote())
    settings = LearnerSettings.from_config(cfg)
    actors = [
        ray.remote(learner_class(lc.strategy)).options(**learner_actor_options(cfg, placed, k)).remote(
            model_path, settings, cfg.algorithm, temperature=r.temperature,
            seed=cfg.run.seed, dtype=cfg.model.dtype, export_dtype=r.dtype or cfg.model.dtype, rank=k,
            world_size=lc.num_ranks, master=master)
        for k in range(lc.num_ranks)
    ]
    if not colocated:
        # disaggregated: the learners' devices are not the engines', so both start at once
        ray.get([e.ping.remote() for e in engines])
        t1 = time.perf_counter()
    ray.get([a.ping.remote() for a in actors])
    logs = "" if cfg.run.verbose else f"; their logs: {run_dir / 'logs'}/ (--verbose shows them here)"
    order = "then" if colocated else "and"
    print(f"[rl] {len(engines)} engine(s) up in {t1 - t0:.0f} s, {order} {len(actors)} learner rank(s) "
          f"({lc.strategy}, {pc.mode}) in {time.perf_counter() - t1:.0f} s more{logs}", flush=True)
    if colocated and pc.engine_sleep_level > 0 and not ray.get(engines[0].sleep_supported.remote()):
        print("[rl] placement colocated: this vLLM build has no sleep mode (CPU), so a sleeping engine only pauses "
              "its scheduler while the learner trains (no memory is freed)", flush=True)
    group = LearnerGroup(actors)
    transport = cfg.weight_transport()
    if ENGINE_WEIGHT_TRANSFER[transport] is not None:
        took = init_weight_transfer(group, engines, r.tensor_parallel_size, cfg.sync.transport_timeout_s, transport)
        formed = ("shared buffers, no group" if transport == "ipc" else
                  f"transfer group of {1 + len(engines) * r.tensor_parallel_size} ranks formed")
        print(f"[rl] weight sync over {transport}: {formed} in {took:.1f} s", flush=True)
    if spec is not None:
        spec.attach(engines, group)
        if ENGINE_WEIGHT_TRANSFER[transport] is not None:  # the drafter goes the way the target's weights go
            spec.push_drafter = lambda: push_drafter_transfer(group, engines, handoff=transport == "ipc")
    return engines, group, spec
