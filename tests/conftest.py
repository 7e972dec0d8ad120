"""Shared fixtures: tiny models built locally once per test session (once for all of pytest-xdist's workers too),
a local Ray."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def session_build(tmp_path_factory, name: str, build) -> str:
    """``build(folder)`` once per test session: with pytest-xdist the workers share the session's temporary folder,
    and the first to ask builds under a file lock while the others wait for it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # <session>/popen-gw0 -> <session>
    out = root / name
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            tmp = root / f"{name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            build(tmp)
            os.replace(tmp, out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The embedded tiny model with a short warm start (enough to emit task-shaped text)."""
    from trainers.tiny_model import build_tiny_model

    return session_build(tmp_path_factory, "tiny_model",
                         lambda out: build_tiny_model(out, seed=0, sft_steps=30, eval_problems=0))


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

    return session_build(tmp_path_factory, "warm_tiny_model",
                         lambda out: build_tiny_model(out, seed=0, eval_problems=0))


@pytest.fixture(scope="session")
def dccot_model_dir(tmp_path_factory) -> str:
    """The embedded DC-CoT model with a short warm start: it writes the director/worker format (its sums are
    often wrong)."""
    from trainers.tiny_dccot import build_tiny_dccot_model

    return session_build(tmp_path_factory, "dccot_model", lambda out: build_tiny_dccot_model(
        out, seed=0, sft_steps=DCCOT_FIXTURE_SFT_STEPS, sft_target_accuracy=None, eval_problems=0))


DCCOT_FIXTURE_SFT_STEPS = 150


# pytest-xdist (scripts/test.sh: -n 2 --dist loadfile) runs each file on one worker, so its module fixtures start
# once. The files whose runs start several learner ranks and engines at once form one group instead, run in turn on
# one worker: two of those side by side oversubscribe 2 cores (a 2x2 run took 209 s beside another, 65 s alone).
MULTIRANK = ("tests/integration/test_placement.py", "tests/integration/test_transport_train.py")
# The files whose first test builds a session model go first: the two workers then build the warm model and the
# DC-CoT model at the same time instead of one waiting for the other's build. Then the multi-rank group.
FIRST = ("tests/e2e/test_train_tiny.py", "tests/integration/test_dccot_engine.py", *MULTIRANK)


def _path(item) -> str:
    return Path(str(item.fspath)).resolve().relative_to(ROOT).as_posix()


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_path(item), len(FIRST)))  # stable: the rest keep their order


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the multi-rank files as one scope (``xdist_group`` marks do not reach pytest-xdist
    3.8's scheduler under pytest 9: the node-id suffix it relies on is dropped)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndMultirank(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "multirank" if path in MULTIRANK else path

    return FilesAndMultirank(config, log)


def pytest_runtest_logreport(report):
    """``RL_TEST_TIMELINE=FILE`` appends each test phase's worker, start and stop (JSON lines): where a run's time
    went per worker, idle tails included (``python -m tests.timeline FILE`` summarizes it)."""
    path = os.environ.get("RL_TEST_TIMELINE")
    if path and getattr(report, "node", None) is None:  # not a worker's report forwarded to xdist's controller
        import json

        row = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": report.nodeid, "phase": report.when,
               "start": report.start, "stop": report.stop, "outcome": report.outcome}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
