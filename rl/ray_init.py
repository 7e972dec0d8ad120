"""Ray start-up shared by ``rl train`` and ``rl eval``: the environment every actor gets, the console capture
(``rl.console``) and a local cluster or an attached one."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rl import console

_FORWARDED_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_")
_FORWARDED_KEYS = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "RL_DATA_DIR", "PYTHONPATH", "HF_HUB_OFFLINE")


def _job_runtime_env() -> dict:
    """The runtime env of the ``ray job submit`` job this driver runs in ({} outside a job)."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return (json.loads(job).get("runtime_env") or {}) if job else {}


def actor_env_vars(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables the driver passes to every actor (the ``ray.init`` runtime env): a few fixed keys,
    ``extra``, and everything named ``NCCL_*``, ``GLOO_*`` or ``TORCH_NCCL_*``. Inside a ``ray job submit`` job,
    keys the job's runtime env already sets are left out (Ray refuses a key set both by the job and by
    ``ray.init``; the job's value reaches the actors anyway). ``PYTORCH_CUDA_ALLOC_CONF`` is never here: the
    learner ranks get it in their own runtime env (``trainers.actors.learner_env_vars``)."""
    env = {
        "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(Path.cwd() / ".cache" / "vllm")),
        "TOKENIZERS_PARALLELISM": "false",
        **(extra or {}),
    }
    for key in _FORWARDED_KEYS:
        if key in os.environ:
            env[key] = os.environ[key]
    for key in sorted(os.environ):
        if key.startswith(_FORWARDED_PREFIXES):
            env[key] = os.environ[key]
    job_env = _job_runtime_env().get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in job_env}


def start_ray(address: str | None, num_cpus: int | None, log_dir: Path, verbose: bool) -> None:
    """``ray.init`` for a run: attach to ``address`` or start a local cluster with ``num_cpus``; every worker of the
    run writes its output to ``log_dir`` and shows the console only what ``rl.console.LineFilter`` lets through
    (everything when ``verbose``)."""
    import ray

    if ray.is_initialized():
        return
    console.quiet_driver(verbose)
    runtime_env: dict = {"env_vars": actor_env_vars(console.worker_env(log_dir, verbose))}
    if "worker_process_setup_hook" not in _job_runtime_env():
        runtime_env["worker_process_setup_hook"] = console.SETUP_HOOK
    if address:
        ray.init(address=address, runtime_env=runtime_env, configure_logging=False)
        return
    # A new local cluster turns token authentication on and says so on every start; the notice restates the default.
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR if not verbose else level)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
                 configure_logging=False)
    finally:
        auth_log.setLevel(level)
