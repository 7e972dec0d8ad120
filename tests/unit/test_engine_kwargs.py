"""The vLLM arguments an engine is built with on a GPU, checked without one (``rollout.engine.llm_kwargs``)."""

import pytest

from rollout.engine import MODEL_RUNNERS, llm_kwargs, resolve_engine_mode

BASE = dict(dtype="bfloat16", seed=0, max_model_len=4096, gpu_memory_utilization=0.6, enforce_eager=False)
SPEC = {"method": "eagle", "model": "/drafter", "num_speculative_tokens": 3}


def test_tensor_parallel_engines_run_their_workers_as_local_processes():
    # inside a Ray actor vLLM would otherwise choose its Ray executor and wait for GPUs the actor already holds
    assert llm_kwargs("/m", **BASE, tensor_parallel_size=2, speculative_config=None, sleep_mode=False,
                      cuda=True)["distributed_executor_backend"] == "mp"
    assert "distributed_executor_backend" not in llm_kwargs("/m", **BASE, tensor_parallel_size=1,
                                                            speculative_config=None, sleep_mode=False, cuda=True)


def test_sleeping_engines_with_a_drafter_keep_its_weights_through_level_2():
    kw = llm_kwargs("/m", **BASE, tensor_parallel_size=1, speculative_config=SPEC, sleep_mode=True, cuda=True)
    assert kw["enable_sleep_mode"] is True and kw["sleep_preserve_parameter_names"] == ["draft.*"]
    plain = llm_kwargs("/m", **BASE, tensor_parallel_size=1, speculative_config=None, sleep_mode=True, cuda=True)
    assert "sleep_preserve_parameter_names" not in plain
    # the engine logs the runner it got; vLLM's engine-args accept every key we pass
    from vllm.engine.arg_utils import EngineArgs

    fields = set(EngineArgs.__dataclass_fields__)
    assert set(kw) - {"model"} <= fields, sorted(set(kw) - fields)


def test_cpu_engines_never_chunk_seeded_prompts_and_never_sleep():
    kw = llm_kwargs("/m", **BASE, tensor_parallel_size=1, speculative_config=None, sleep_mode=False, cuda=False)
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] == 4096
    assert "enable_sleep_mode" not in kw


def test_model_runner_choices():
    assert MODEL_RUNNERS == {"auto": None, "v1": "0", "v2": "1"}


def test_engines_run_eager_and_in_process_on_cpu_and_compiled_in_their_own_process_on_gpus():
    assert resolve_engine_mode(None, "auto", cuda=False) == (True, True)
    assert resolve_engine_mode(None, "auto", cuda=True) == (False, False)
    # what the config says wins on either device
    assert resolve_engine_mode(False, "process", cuda=False) == (False, False)
    assert resolve_engine_mode(True, "in_process", cuda=True) == (True, True)
    with pytest.raises(ValueError, match=r"engine_core='threads': use one of \['auto', 'in_process', 'process'\]"):
        resolve_engine_mode(None, "threads", cuda=False)
