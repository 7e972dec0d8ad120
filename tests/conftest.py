"""Shared fixtures: a tiny model built locally once per test session, a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The embedded tiny model with a short warm start (enough to emit task-shaped text)."""
    from trainers.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(out, seed=0, sft_steps=30, eval_problems=0)
    return str(out)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (shut down after it, so other modules may start their own)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("VLLM_CACHE_ROOT", "VLLM_CPU_KVCACHE_SPACE")}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def warm_tiny_model_dir(tmp_path_factory) -> str:
    """The embedded tiny model with its default warm start (right about 20% of the time when sampling)."""
    from trainers.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("warm_tiny_model")
    build_tiny_model(out, seed=0, eval_problems=0)
    return str(out)


@pytest.fixture(scope="session")
def dccot_model_dir(tmp_path_factory) -> str:
    """The embedded DC-CoT model with a short warm start: it writes the director/worker format (its sums are
    often wrong)."""
    from trainers.tiny_dccot import build_tiny_dccot_model

    out = tmp_path_factory.mktemp("dccot_model")
    build_tiny_dccot_model(out, seed=0, sft_steps=DCCOT_FIXTURE_SFT_STEPS, sft_target_accuracy=None, eval_problems=0)
    return str(out)


DCCOT_FIXTURE_SFT_STEPS = 150
