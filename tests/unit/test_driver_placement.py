"""Driver-side placement helpers: actor environment (inside a Ray job, communication settings, the learner-only
allocator setting), CPU engine core binding, bundles and placement groups, node-label config."""

import json

import pytest

from rl import placement
from rl.config import load_config
from rl.ray_init import actor_env_vars
from trainers import actors
from trainers.job import start_local_or_attach


def test_actor_env_leaves_out_keys_the_ray_job_sets(monkeypatch):
    monkeypatch.setenv("RL_DATA_DIR", "/data/math")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = actor_env_vars()
    assert env["RL_DATA_DIR"] == "/data/math" and env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    job = {"runtime_env": {"env_vars": {"RL_DATA_DIR": "/data/math"}, "working_dir": "."}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = actor_env_vars()
    assert "RL_DATA_DIR" not in env  # the job's runtime env carries it; passing it again would be refused
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_cpu_engines_get_disjoint_cores(monkeypatch):
    monkeypatch.setattr(actors.os, "cpu_count", lambda: 2)
    assert [actors._cpu_binding(i, 2) for i in range(2)] == ["0", "1"]
    monkeypatch.setattr(actors.os, "cpu_count", lambda: 8)
    assert [actors._cpu_binding(i, 2) for i in range(2)] == ["0-3", "4-7"]
    assert actors._cpu_binding(0, 1) == "0-7"


def test_communication_settings_reach_every_actor_and_the_allocator_only_learners(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    for key in [k for k in actors.os.environ if k.startswith(("NCCL_", "GLOO_", "TORCH_NCCL_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    monkeypatch.setenv("MY_NCCL_THING", "no")  # only the prefixes
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env = actor_env_vars()
    assert {k: env[k] for k in env if "NCCL" in k or "GLOO" in k} == {
        "NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "INFO", "GLOO_SOCKET_IFNAME": "eth1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env  # never for every actor
    assert actors.learner_env_vars() == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    # a local Ray's workers inherit the driver's environment: the engines get the key blanked
    assert actors.engine_env_vars() == {"PYTORCH_CUDA_ALLOC_CONF": ""}
    # a job that sets a forwarded key itself keeps it (Ray refuses the key twice)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"NCCL_DEBUG": "WARN"}}}))
    env = actor_env_vars()
    assert "NCCL_DEBUG" not in env and env["NCCL_SOCKET_IFNAME"] == "ib0"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert actors.learner_env_vars() == {} and actors.engine_env_vars() == {}  # nothing set: nothing changed


def test_bundles_never_empty_and_gpu_only_when_asked():
    assert placement.bundle(1, 0) == {"CPU": 1.0}
    assert placement.bundle(0, 0) == {"CPU": 0.001}  # Ray rejects an empty bundle
    assert placement.bundle(4, 1) == {"CPU": 4.0, "GPU": 1.0}


def _cfg(*overrides):
    return load_config("configs/tiny_cpu.yaml", ["model.build_tiny=true", *overrides])


def test_group_specs_per_mode():
    gpu = ["learner.num_gpus=1", "rollout.num_gpus_per_engine=1", "learner.num_cpus=2",
           "rollout.num_cpus_per_engine=3", "learner.num_ranks=2", "learner.strategy=fsdp2", "rollout.num_engines=2"]
    (co,) = placement.group_specs(_cfg(*gpu, "placement.mode=colocated", "placement.strategy=SPREAD"))
    assert co.name == "colocated" and co.strategy == "SPREAD" and co.labels == {}
    assert co.bundles == [{"CPU": 5.0, "GPU": 1.0}] * 2  # one GPU per pair, both actors' CPUs
    cfg = _cfg(*gpu[:-1], "rollout.num_engines=3", "placement.learner_node_labels={rl-role: learner}",
               "placement.engine_node_labels={rl-role: rollout, zone: 'in(a, b)'}")
    learner, engine = placement.group_specs(cfg)
    assert learner.bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2 and learner.labels == {"rl-role": "learner"}
    assert engine.bundles == [{"CPU": 3.0, "GPU": 1.0}] * 3
    assert engine.labels == {"rl-role": "rollout", "zone": "in(a, b)"}
    assert placement.describe_request(engine) == ("engine group: 3 x {CPU: 3, GPU: 1} (PACK, nodes labelled "
                                                  "rl-role=rollout,zone=in(a, b))")
    (co,) = placement.group_specs(_cfg(*gpu, "placement.mode=colocated", "placement.learner_node_labels={gpu: h100}",
                                       "placement.engine_node_labels={pool: rl}"))
    assert co.labels == {"gpu": "h100", "pool": "rl"}  # a shared bundle needs a node that suits both


def test_node_labels_are_validated_at_load():
    assert _cfg().placement.learner_node_labels == {} and _cfg().placement.engine_node_labels == {}
    with pytest.raises(Exception, match="label value 'a b'"):
        _cfg("placement.learner_node_labels={rl-role: a b}")
    with pytest.raises(Exception, match="label key '-x'"):
        _cfg("placement.engine_node_labels={-x: a}")
    with pytest.raises(Exception, match="no node can satisfy both"):
        _cfg("learner.num_ranks=2", "learner.strategy=fsdp2", "rollout.num_engines=2", "placement.mode=colocated",
             "placement.learner_node_labels={rl-role: learner}", "placement.engine_node_labels={rl-role: rollout}")
    cfg = _cfg("placement.engine_node_labels={example.com/pool: '!spot', ray.io/accelerator-type: H100}")
    assert cfg.placement.engine_node_labels == {"example.com/pool": "!spot", "ray.io/accelerator-type": "H100"}


def test_labels_need_a_cluster(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init must not run"))
    with pytest.raises(ValueError, match="set ray.address"):
        start_local_or_attach(_cfg("placement.learner_node_labels={rl-role: learner}"), tmp_path)
