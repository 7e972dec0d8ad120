"""The rollout engine: one ``vllm.LLM`` that samples groups of responses and receives new weights.

``Engine`` is a plain class so that it can be used in-process (tests, ``rl eval`` on one machine); the driver
wraps it as a Ray actor with ``ray.remote(Engine)``. The same code runs on the CPU build of vLLM and on GPUs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from rl.console import name_log
from rl.round_robin import deal, interleave
from rl.types import Rollout
from rollout.vllm_plugin import WEIGHT_TRANSFER_ENGINES

WORKER_EXTENSION = "rollout.worker_ext.WeightSyncExtension"
SLEEP_TAGS = ("weights", "kv_cache")
"""What ``Engine.sleep`` puts to sleep; vLLM resumes scheduling only once every one of them is awake again."""
WEIGHT_TRANSFER_BACKENDS = tuple(WEIGHT_TRANSFER_ENGINES)
"""Backends of vLLM's weight-transfer API an engine can start with (``rollout.weight_transfer``)."""
ENGINE_CORES = ("auto", "in_process", "process")
"""``rollout.engine_core``: where vLLM's engine core runs (``VLLM_ENABLE_V1_MULTIPROCESSING``)."""
MODEL_RUNNERS = {"auto": None, "v1": "0", "v2": "1"}
"""``rollout.model_runner`` -> ``VLLM_USE_V2_MODEL_RUNNER`` (None: vLLM's choice: V2 on CUDA with Triton, V1 on
the CPU build)."""


def resolve_engine_mode(enforce_eager: bool | None, engine_core: str, cuda: bool) -> tuple[bool, bool]:
    """(eager, in_process) for an engine on a CUDA machine or not. ``None`` / ``auto`` pick by device: on CPU an
    eager engine with its core in the engine's own process starts in seconds (measured on 2 cores with the tiny
    model: 3 s against 31 s for a compiled core in its own process, whose compile cache vLLM 0.32 fails to reload,
    and two more process start-ups); on GPUs compilation and CUDA graphs pay for themselves, and a separate core
    process overlaps scheduling with the GPU's work."""
    if engine_core not in ENGINE_CORES:
        raise ValueError(f"engine_core={engine_core!r}: use one of {list(ENGINE_CORES)}")
    eager = (not cuda) if enforce_eager is None else bool(enforce_eager)
    in_process = (not cuda) if engine_core == "auto" else engine_core == "in_process"
    return eager, in_process


@dataclass(frozen=True)
class GenerationRequest:
    """n samples for one prompt. ``seed`` makes the request reproducible (resume gives identical samples)."""

    prompt_id: str
    prompt: str
    n: int
    seed: int | None = None


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    min_tokens: int = 0
    """Tokens before a stop token may end a response (benchmarks set it to max_tokens for equal-length runs)."""


def llm_kwargs(model_path: str, *, dtype: str, seed: int, max_model_len: int, gpu_memory_utilization: float,
               enforce_eager: bool, tensor_parallel_size: int, speculative_config: dict | None, sleep_mode: bool,
               cuda: bool, weight_transfer: str | None = None, max_lora_rank: int | None = None) -> dict:
    """Keyword arguments of ``vllm.LLM`` for an engine (``sleep_mode``: vLLM's sleep mode, CUDA only;
    ``weight_transfer``: the backend of vLLM's weight-transfer engine, ``gloo``, ``rl_nccl`` or ``rl_ipc``
    (``rollout.weight_transfer``); None: weights arrive through the worker extension only; ``max_lora_rank``: serve
    LoRA adapters up to this rank, one at a time (``model.lora``: ``Engine.load_adapter``))."""
    kwargs = dict(
        model=model_path,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        tensor_parallel_size=tensor_parallel_size,
        # Log-probs after temperature, as the learner computes them: needed for exact importance ratios.
        logprobs_mode="processed_logprobs",
        worker_extension_cls=WORKER_EXTENSION,
        disable_log_stats=speculative_config is None,
    )
    if speculative_config:
        kwargs["speculative_config"] = speculative_config
    if weight_transfer is not None:
        if weight_transfer not in WEIGHT_TRANSFER_BACKENDS:
            raise ValueError(f"weight_transfer={weight_transfer!r}: use one of {list(WEIGHT_TRANSFER_BACKENDS)} "
                             "(or None for the object store)")
        kwargs["weight_transfer_config"] = {"backend": weight_transfer}
    if max_lora_rank is not None:
        # one adapter at a time: each sync's adapter replaces the previous one (Engine.load_adapter)
        kwargs.update(enable_lora=True, max_lora_rank=int(max_lora_rank), max_loras=1, max_cpu_loras=2)
    if tensor_parallel_size > 1:
        # Inside a Ray actor vLLM would pick its Ray executor, whose workers then wait for GPUs this actor already
        # holds; the actor sees its TP GPUs, so the workers are local processes.
        kwargs["distributed_executor_backend"] = "mp"
    if sleep_mode:
        kwargs["enable_sleep_mode"] = True
        if speculative_config:
            # level 2 would discard the drafter's own weights; vLLM keeps parameters named here through it
            kwargs["sleep_preserve_parameter_names"] = ["draft.*"]
    if not cuda:
        # vLLM's CPU build fails ("CPU Generator does not use offset") when a request with its own seed has its
        # prompt prefilled in chunks, which happens once a batch's prompts exceed the token budget. We seed every
        # request, so prompts are never chunked on CPU: whole prompts, budget >= the context length.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(max_model_len, 4096)
    return kwargs


class Engine:
    """Owns a vLLM engine. Construct inside the process that will use it (vLLM spawns workers)."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 512,
        gpu_memory_utilization: float = 0.15,
        enforce_eager: bool | None = None,
        engine_core: str = "auto",
        tensor_parallel_size: int = 1,
        speculative_config: dict | None = None,
        enable_sleep_mode: bool = False,
        model_runner: str = "auto",
        weight_transfer: str | None = None,
        max_lora_rank: int | None = None,
        adapter_dir: str | None = None,
    ) -> None:
        name_log("engine")  # <run>/logs/engine-<pid>.log when the run captures its workers' output
        os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(os.getcwd(), ".cache", "vllm"))
        if model_runner not in MODEL_RUNNERS:
            raise ValueError(f"model_runner={model_runner!r}: use one of {list(MODEL_RUNNERS)}")
        if MODEL_RUNNERS[model_runner] is not None:  # read by vLLM in this process and the ones it spawns
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = MODEL_RUNNERS[model_runner]
        import torch

        cuda = torch.cuda.is_available()
        eager, in_process = resolve_engine_mode(enforce_eager, engine_core, cuda)
        # read by vLLM when the LLM is built (vllm.envs reads the environment lazily until the engine is up)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        from vllm import LLM

        from rollout.vllm_plugin import register

        register()  # the engine-core calls, for an engine core in this process (a spawned one loads the plugin)

        # Colocated engines sleep while the learner trains. vLLM's CPU build has no sleep mode (it rejects
        # enable_sleep_mode), so there a sleep is vLLM's level 0, a scheduler pause that frees nothing, kept until
        # every tag is awake, exactly as a GPU engine's scheduler is: the driver's order runs the same on both.
        self.sleep_mode = bool(enable_sleep_mode)
        self.can_sleep = bool(enable_sleep_mode and cuda)
        self.asleep: set[str] = set()
        t0 = time.perf_counter()
        kwargs = llm_kwargs(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=eager,
                            tensor_parallel_size=tensor_parallel_size, speculative_config=speculative_config,
                            sleep_mode=self.can_sleep, cuda=cuda, weight_transfer=weight_transfer,
                            max_lora_rank=max_lora_rank)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.weight_version = 0
        self.weight_transfer = weight_transfer
        self.sync_failure: str | None = None  # set by a weight transfer that broke off; cleared by a complete one
        # model.lora: the adapter every generation and the canary's scoring run through (None: the base weights)
        self.lora_request = None
        self.lora_enabled = max_lora_rank is not None
        self._adapter_root = adapter_dir  # where load_adapter writes each version (None: a temporary directory)
        self.start_s = time.perf_counter() - t0
        self.runner = self.model_runner_name()
        self.eager, self.in_process = eager, in_process
        print(f"[engine] vLLM model runner {self.runner} (rollout.model_runner={model_runner}), dtype {dtype}, "
              f"{'eager' if eager else 'compiled'}, core {'in this process' if in_process else 'in its own process'}, "
              f"started in {self.start_s:.0f} s", flush=True)

    def engine_mode(self) -> dict:
        """How this engine runs: ``eager`` (no compilation), ``in_process`` (its core in this process), ``runner``."""
        return {"eager": self.eager, "in_process": self.in_process, "runner": self.runner}

    def model_runner_name(self) -> str:
        """``v1`` or ``v2``: the model runner vLLM chose (V2 is vLLM's CUDA default; the CPU build runs V1)."""
        module = self.llm.collective_rpc("rl_model_runner_module")[0]
        return "v2" if ".worker.gpu." in module else "v1"

    def _require_awake(self, what: str) -> None:
        if self.sync_failure is not None:
            raise RuntimeError(f"engine asked to {what} after a weight sync broke off ({self.sync_failure}): some of "
                               f"its layers may hold new weights while it reports version {self.weight_version}")
        if self.asleep:
            raise RuntimeError(
                f"engine asked to {what} while {sorted(self.asleep)} is asleep: vLLM keeps its scheduler paused "
                "until every tag is awake, so the request would wait forever. Wake every tag first "
                "(wake_up(['weights']), push the weights, wake_up(['kv_cache']), then generate).")

    # ---------------------------------------------------------------- generation
    def generate(self, requests: list[GenerationRequest], settings: SamplingSettings) -> list[list[Rollout]]:
        """Sample ``r.n`` responses per request; returns one list of rollouts per request, in order."""
        from vllm import SamplingParams

        if not requests:
            return []
        self._require_awake("generate")
        params = [
            SamplingParams(
                n=r.n,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=-1 if settings.top_p >= 1.0 else 0,
                max_tokens=settings.max_tokens,
                min_tokens=settings.min_tokens,
                seed=r.seed,
                logprobs=0,  # the sampled token's log-prob only
            )
            for r in requests
        ]
        outputs = self.llm.generate([r.prompt for r in requests], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        groups: list[list[Rollout]] = []
        for req, out in zip(requests, outputs):
            group = []
            for comp in out.outputs:
                ids = list(comp.token_ids)
                lps = [float(step[tok].logprob) for step, tok in zip(comp.logprobs or [], ids)]
                if len(lps) != len(ids):
                    raise RuntimeError(f"engine returned {len(lps)} log-probs for {len(ids)} tokens")
                group.append(
                    Rollout(
                        prompt_id=req.prompt_id,
                        prompt_token_ids=list(out.prompt_token_ids),
                        response_token_ids=ids,
                        logprobs=lps,
                        finish_reason="length" if comp.finish_reason == "length" else "stop",
                        policy_version=self.weight_version,
                        response_text=comp.text,
                    )
                )
            groups.append(group)
        return groups

    def generate_tokens(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        max_tokens: list[int],
        stops: list[list[str]],
        settings: SamplingSettings,
        prompt_ids: list[str] | None = None,
    ) -> list[Rollout]:
        """One sample per token-id prompt, each with its own seed, token limit and stop strings (kept in the
        output): the DC-CoT executor's ``generate_fn`` (``rollout.dccot.GenerateFn``). ``settings.max_tokens`` is
        not used. Prompts are not re-tokenized, so the sample continues exactly the given tokens."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        n = len(prompts)
        if not (len(seeds) == len(max_tokens) == len(stops) == n) or (prompt_ids is not None and len(prompt_ids) != n):
            raise ValueError(f"generate_tokens: {n} prompts but {len(seeds)} seeds, {len(max_tokens)} max_tokens, "
                             f"{len(stops)} stop lists" + ("" if prompt_ids is None else f", {len(prompt_ids)} ids"))
        if not prompts:
            return []
        self._require_awake("generate")
        params = [
            SamplingParams(
                n=1,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=-1 if settings.top_p >= 1.0 else 0,
                max_tokens=int(limit),
                seed=int(seed),
                stop=list(stop) or None,
                include_stop_str_in_output=True,
                logprobs=0,
            )
            for seed, limit, stop in zip(seeds, max_tokens, stops)
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        rollouts = []
        for k, out in enumerate(outputs):
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            lps = [float(step[tok].logprob) for step, tok in zip(comp.logprobs or [], ids)]
            if len(lps) != len(ids):
                raise RuntimeError(f"engine returned {len(lps)} log-probs for {len(ids)} tokens")
            rollouts.append(Rollout(
                prompt_id=prompt_ids[k] if prompt_ids is not None else f"req-{k}",
                prompt_token_ids=list(prompts[k]),
                response_token_ids=ids,
                logprobs=lps,
                finish_reason="length" if comp.finish_reason == "length" else "stop",
                policy_version=self.weight_version,
                response_text=comp.text,
            ))
        return rollouts

    def score_tokens(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Log-probs (temperature 1) the engine assigns to given responses: ``[(prompt_ids, response_ids)]``.

        Used by the weight-sync canary: computed from the prompt log-probs of prompt+response, through the adapter
        the engine serves (``model.lora``), as every generation is.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_awake("score tokens")
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0)
        prompts = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        result = []
        for (p, r), out in zip(sequences, outputs):
            plp = out.prompt_logprobs
            ids = list(p) + list(r)
            result.append([float(plp[i][ids[i]].logprob) for i in range(len(p), len(ids))])
        return result

    # ---------------------------------------------------------------- weights
    def load_weights(self, blob: bytes, version: int) -> dict:
        """Push a full state dict (safetensors bytes) into every worker; clears the prefix cache."""
        return self.load_weight_bucket(blob, version, True)

    def load_weight_bucket(self, blob: bytes, version: int, final: bool) -> dict:
        """Push one bucket of the weights (``Learner.next_weight_bucket``'s bytes) into every worker. After the
        ``final`` bucket the engine serves ``version`` and its prefix cache is cleared (its blocks hold keys and
        values of the old weights)."""
        t0 = time.perf_counter()
        results = self.llm.collective_rpc("rl_load_weight_bucket", args=(blob, version, final))
        if final:
            self.llm.reset_prefix_cache()
            self.weight_version = int(version)
            versions = {r["version"] for r in results}
            if versions != {int(version)}:
                raise RuntimeError(f"weight sync: workers report versions {versions}, expected {version}")
        return {"version": self.weight_version, "sync_s": time.perf_counter() - t0, "bytes": len(blob)}

    def load_adapter(self, files: dict[str, bytes], version: int) -> dict:
        """``model.lora``'s sync: the adapter (``trainers.lora.adapter_files``) written into this engine's own
        directory and loaded by vLLM as a new LoRA request whose id is new for every version (vLLM caches adapters
        by id: reusing one would keep serving the old adapter). It replaces the previous adapter only once vLLM has
        loaded it, and only then does the engine serve ``version``."""
        import shutil
        import tempfile
        from pathlib import Path

        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise RuntimeError("load_adapter on an engine started without LoRA (max_lora_rank)")
        self._require_awake("load an adapter")
        t0 = time.perf_counter()
        if self._adapter_root is None:  # removed at a clean exit (the driver gives a directory of the run instead)
            import atexit

            self._adapter_root = tempfile.mkdtemp(prefix="rl-adapter-")
            atexit.register(shutil.rmtree, self._adapter_root, True)
        directory = Path(self._adapter_root) / f"v{int(version)}"
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        for name, data in files.items():  # adapter_config.json, adapter_model.safetensors
            (directory / name).write_bytes(data)
        old = self.lora_request
        lora_id = (old.lora_int_id + 1) if old is not None else 1
        request = LoRARequest(f"policy-v{int(version)}", lora_id, str(directory))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter of version {version} from {directory}")
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            if old.lora_path != str(directory):
                shutil.rmtree(old.lora_path, ignore_errors=True)
        self.lora_request = request
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)
        return {"version": self.weight_version, "lora_id": lora_id, "sync_s": time.perf_counter() - t0,
                "bytes": sum(len(b) for b in files.values())}

    def served_adapter(self) -> dict | None:
        """The LoRA request generations run through (name, id, path), None when serving the base weights."""
        r = self.lora_request
        return None if r is None else {"name": r.lora_name, "lora_id": r.lora_int_id, "path": r.lora_path}

    # The control plane of vLLM's weight-transfer API (engines started with ``weight_transfer``): the driver calls
    # these on every engine while the learner's sender broadcasts (``trainers.sync.push_weights_transfer``).
    def init_weight_transfer(self, init_info: dict) -> float:
        """Join the transfer group (blocks until the sender and every other worker have joined); seconds."""
        t0 = time.perf_counter()
        self.llm.init_weight_transfer_engine({"init_info": dict(init_info)})
        return time.perf_counter() - t0

    def start_weight_update(self, draft: bool = False) -> None:
        """Begin a sync of the target model (or of the speculative drafter, ``draft``)."""
        if draft:
            self.llm.start_draft_weight_update()
        else:
            self.llm.start_weight_update()

    def update_weights(self, update_info: dict) -> dict:
        """Receive one bucket (its metadata here, its bytes from the transfer group) and load it. A failed receive
        ends the sync: the engine keeps its version, and refuses to generate until a complete sync arrives."""
        t0 = time.perf_counter()
        try:
            self.llm.update_weights({"update_info": dict(update_info)})
        except Exception as e:
            self.sync_failure = (f"bucket {int(update_info.get('bucket', 0)) + 1}/"
                                 f"{int(update_info.get('num_buckets', 1))}: {str(e).splitlines()[0][:300]}")
            raise
        return {"sync_s": time.perf_counter() - t0}

    def finish_weight_update(self, version: int | None) -> dict:
        """End a sync. For the target model (``version`` given): the layerwise reload is finalized, every parameter
        checked to have arrived, the prefix cache cleared (its blocks hold the old weights' keys and values) and
        ``version`` served from now on; for the drafter (None) the version stays."""
        t0 = time.perf_counter()
        try:
            self.llm.finish_weight_update()
        except Exception as e:
            self.sync_failure = f"finish: {str(e).splitlines()[0][:300]}"
            raise
        self.llm.reset_prefix_cache()
        stats = self.llm.collective_rpc("rl_weight_transfer_stats")
        if version is not None:
            self.llm.collective_rpc("rl_set_weight_version", args=(int(version),))
            self.weight_version = int(version)
            self.sync_failure = None
        return {"version": self.weight_version, "finish_s": time.perf_counter() - t0,
                "recv_s": max(s["recv_s"] for s in stats), "load_s": max(s["load_s"] for s in stats)}

    def load_drafter_weights(self, blob: bytes) -> dict:
        """Replace the speculative drafter's weights in place (``rollout.drafter.checkpoint.weights_for_reload``
        bytes); clears the prefix cache, whose blocks hold the old drafter's keys and values."""
        t0 = time.perf_counter()
        results = self.llm.collective_rpc("rl_load_drafter_weights", args=(blob,))
        self.llm.reset_prefix_cache()
        return {"sync_s": time.perf_counter() - t0, "bytes": len(blob),
                "num_tensors": int(results[0]["num_tensors"])}

    def spec_decode_counters(self):
        """Cumulative speculative-decoding counters (``rollout.drafter.metrics.SpecDecodeCounters``); all zero for an
        engine without speculative decoding."""
        from rollout.drafter.metrics import SpecDecodeCounters

        return SpecDecodeCounters.from_metrics(self.llm.get_metrics() if self.llm.llm_engine.log_stats else [])

    def spec_decode_delta(self):
        """Counters since the previous ``spec_decode_delta`` call (since start-up on the first call)."""
        from rollout.drafter.metrics import SpecDecodeCounters

        now = self.spec_decode_counters()
        delta = now.minus(getattr(self, "_spec_decode_seen", SpecDecodeCounters()))
        self._spec_decode_seen = now
        return delta

    def _core_call(self, method: str, *args):
        """Call an ``EngineCore`` method (``rollout.vllm_plugin``) in the engine-core process, or in this one."""
        client = self.llm.llm_engine.engine_core
        if hasattr(client, "call_utility"):
            return client.call_utility(method, *args)
        return getattr(client.engine_core, method)(*args)

    def set_spec_schedule(self, ranges: list[tuple[int, int, int]]) -> list[int]:
        """Number of speculative tokens per running batch size from now on: ``[(first, last, K), ...]`` inclusive
        batch-size ranges from 1 (K = 0: no drafting; K above the engine's ``num_speculative_tokens`` is capped).
        Returns K for batch sizes 1..max_num_seqs."""
        return list(self._core_call("rl_set_spec_schedule", [list(map(int, r)) for r in ranges]))

    def spec_step_stats(self, reset: bool = True) -> list[list[float]]:
        """Decode steps since the previous call, per running batch size and K:
        ``[[batch size, K, steps, tokens produced, seconds], ...]``."""
        return list(self._core_call("rl_spec_step_stats", bool(reset)))

    def sleep_supported(self) -> bool:
        """Whether a sleep frees device memory (a CUDA engine with sleep mode); a CPU engine only pauses."""
        return self.can_sleep

    def sleep(self, level: int) -> float:
        """Free device memory while a colocated learner trains (level 1: offload weights, drop the KV cache;
        level 2: drop both; the next sync brings the weights back). Without sleep mode on this build (CPU) the
        scheduler is paused instead. Either way nothing is scheduled until ``wake_up`` has woken every tag.
        Returns seconds; 0 when the engine was started without sleep mode or ``level`` is 0."""
        if not self.sleep_mode or level == 0:
            return 0.0
        if self.asleep:
            raise RuntimeError(f"engine is already asleep ({sorted(self.asleep)} not woken)")
        t0 = time.perf_counter()
        self.llm.sleep(level=level if self.can_sleep else 0)
        self.asleep = set(SLEEP_TAGS)
        return time.perf_counter() - t0

    def wake_up(self, tags: list[str] | None = None) -> float:
        """Re-allocate what ``sleep`` freed: ``["weights"]`` before a sync, ``["kv_cache"]`` after it (None: both).
        The engine schedules again once every tag is awake; vLLM's own answer to that is checked. Returns
        seconds; 0 when the engine is not asleep."""
        if not self.asleep:
            return 0.0
        tags = list(SLEEP_TAGS) if tags is None else list(tags)
        unknown = sorted(set(tags) - set(SLEEP_TAGS))
        if unknown:
            raise ValueError(f"wake_up tags {unknown}: use {list(SLEEP_TAGS)}")
        t0 = time.perf_counter()
        remaining = self.asleep - set(tags)
        if self.can_sleep:
            fully_awake = bool(self.llm.wake_up(tags=tags))
        else:
            fully_awake = bool(self.llm.wake_up(tags=["scheduling"])) if not remaining else False
        if fully_awake != (not remaining):
            raise RuntimeError(f"engine wake_up({tags}): vLLM reports fully awake={fully_awake}, while "
                               f"{sorted(remaining) or 'nothing'} should still be asleep")
        self.asleep = remaining
        return time.perf_counter() - t0

    def worker_weight_versions(self) -> list[int]:
        return list(self.llm.collective_rpc("rl_weight_version"))

    def ping(self) -> int:
        return self.weight_version


def engines_generate_fn(engines: list, settings: SamplingSettings):
    """``rollout.dccot.GenerateFn`` over Engine actors: requests round-robin over ``engines`` (each shard one
    ``generate_tokens`` call, all in flight at once), rollouts back in request order."""
    import ray

    def generate_fn(prompts, seeds, max_tokens, stops) -> list[Rollout]:
        shares = zip(engines, *(deal(x, len(engines)) for x in (prompts, seeds, max_tokens, stops)))
        futures = [engine.generate_tokens.remote(p, s, m, st, settings) for engine, p, s, m, st in shares if p]
        return interleave(ray.get(futures))

    return generate_fn
