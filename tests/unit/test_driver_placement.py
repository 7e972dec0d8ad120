"""Driver-side placement helpers: actor environment inside a Ray job, CPU engine core binding, bundles."""

import json

from rl import driver


def test_actor_env_leaves_out_keys_the_ray_job_sets(monkeypatch):
    monkeypatch.setenv("RL_DATA_DIR", "/data/math")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = driver.actor_env_vars()
    assert env["RL_DATA_DIR"] == "/data/math" and env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    job = {"runtime_env": {"env_vars": {"RL_DATA_DIR": "/data/math"}, "working_dir": "."}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = driver.actor_env_vars()
    assert "RL_DATA_DIR" not in env  # the job's runtime env carries it; passing it again would be refused
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_cpu_engines_get_disjoint_cores(monkeypatch):
    monkeypatch.setattr(driver.os, "cpu_count", lambda: 2)
    assert [driver._cpu_binding(i, 2) for i in range(2)] == ["0", "1"]
    monkeypatch.setattr(driver.os, "cpu_count", lambda: 8)
    assert [driver._cpu_binding(i, 2) for i in range(2)] == ["0-3", "4-7"]
    assert driver._cpu_binding(0, 1) == "0-7"


def test_bundles_never_empty_and_gpu_only_when_asked():
    assert driver._bundle(1, 0) == {"CPU": 1.0}
    assert driver._bundle(0, 0) == {"CPU": 0.001}  # Ray rejects an empty bundle
    assert driver._bundle(4, 1) == {"CPU": 4.0, "GPU": 1.0}
