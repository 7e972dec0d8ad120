"""Per-GPU (or host) memory of a plan: the learner rank's weights, gradients, optimizer, activations and log-prob
peak, the drafter, the engine's weights, LoRA slots and KV cache, phase by phase."""

from __future__ import annotations

import math
from typing import Any

from rl.plan.base import (
    AUTO_CPU_LOGITS_BYTES,
    CUDA_CONTEXT_BYTES,
    DRAFTER_CHUNK_BYTES,
    DTYPE_BYTES,
    ENGINE_OVERHEAD_BYTES,
    FUSED_BUFFER_BYTES,
    GIB,
    ModelShape,
    _ceil_div,
    _Findings,
    _gib,
    _size,
    _tokens,
    engine_dtype,
    master_dtype,
)


def _resolve_logprob_kernel(cfg, shape: ModelShape, learner_on_gpu: bool, tokens: int) -> str:
    k = cfg.learner.kernels.logprob
    if k != "auto":
        return k
    if learner_on_gpu:
        return "triton"
    return "chunked" if tokens * shape.vocab * 4 > AUTO_CPU_LOGITS_BYTES else "naive"


def _learner_memory(cfg, shape: ModelShape, on_gpu: bool, tokens: int) -> dict[str, Any]:
    lc = cfg.learner
    ds = lc.strategy == "deepspeed"
    c = DTYPE_BYTES[cfg.model.dtype]  # the compute dtype
    b = c if ds else DTYPE_BYTES[lc.param_dtype]  # the parameters' own (DeepSpeed: its module, in the compute dtype)
    fsdp = lc.strategy == "fsdp2" or ds  # both shard parameters, gradients and optimizer state over the ranks
    n = lc.num_ranks if fsdp else 1
    p = shape.num_params()
    p_layer, p_root = shape.layer_params(), shape.root_params()
    ref = cfg.algorithm.kl_coef > 0

    params = _ceil_div(p * b, n)
    states = {
        "parameters": params,
        "gradients": params,
        "optimizer": 2 * params,
        "reference": _ceil_div(p * c, n) if ref else 0,  # frozen: held in the compute dtype
    }
    lora = cfg.model.lora
    adapter = shape.lora_params(lora.rank, lora.target_modules) if lora is not None else 0
    if lora is not None:  # frozen base in the compute dtype; adapters, their gradients and AdamW state in param_dtype
        held = _ceil_div(adapter * b, n)  # sharded like the base under fsdp2 / deepspeed
        states = {"parameters": _ceil_div(p * c, n) + held, "gradients": held, "optimizer": 2 * held,
                  "reference": states["reference"]}
    trained = adapter if lora is not None else p
    if ds and b < 4:  # ZeRO-3 in bf16/fp16 keeps fp32 gradient partitions and fp32 master weights beside AdamW
        states["gradients"] = _ceil_div(trained * 4, n)
        states["optimizer"] = _ceil_div(3 * trained * 4, n)
    if ds:
        host = {"parameters": lc.deepspeed.offload_params, "reference": lc.deepspeed.offload_params,
                "gradients": lc.deepspeed.offload_optimizer, "optimizer": lc.deepspeed.offload_optimizer}
    else:
        host = dict.fromkeys(states, fsdp and lc.fsdp.cpu_offload)
    host = {k: bool(v and on_gpu) for k, v in host.items()}
    offload = any(host.values())
    on_device = {k: (0 if host[k] else v) for k, v in states.items()}
    if not fsdp:  # autocast's compute-dtype copies of the weights, forward to backward (with LoRA: the adapters)
        gathered = trained * c if c < b else 0
    elif ds or lc.fsdp.reshard_after_forward:  # ZeRO-3 gathers module by module, like FSDP2 with resharding
        gathered = c * (2 * p_root + 3 * p_layer)
    else:
        gathered = c * (p + p_root + p_layer)
    h, q, k, inter, layers, v = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate, shape.layers, shape.vocab
    per_token_layer = c * (2 * q + 2 * k + 4 * inter) + 2 * h * (2 * c + (4 if c < 4 else 0))
    if lc.activation_checkpointing:
        activations = tokens * (layers * h * c + per_token_layer)
    else:
        activations = tokens * layers * per_token_layer
    kernel = _resolve_logprob_kernel(cfg, shape, on_gpu, tokens)
    logprob = tokens * v * (c + 8) if kernel == "naive" else FUSED_BUFFER_BYTES + v * h * 4
    context = CUDA_CONTEXT_BYTES if on_gpu else 0
    whole = (p * c + adapter * b if lora is not None else p * b) + (p * c if ref else 0)
    drafter = _drafter_memory(cfg, shape)
    train = sum(on_device.values()) + drafter["states"] + gathered + activations + logprob + context
    # the gradients are freed at the end of each update (DeepSpeed's partitions are one persistent buffer)
    resident = sum(on_device.values()) - (0 if ds else on_device["gradients"]) + drafter["states"] + context
    generating = resident + drafter["work"]
    load = whole + context if not fsdp else resident  # fsdp2 loads into host RAM and moves only its shard
    return {
        "strategy": lc.strategy,
        "shards": n,
        "param_bytes": b,
        "compute_bytes": c,
        "master_dtype": master_dtype(cfg),
        "compute_dtype": cfg.model.dtype,
        "cpu_offload": bool(offload),
        "reference_policy": ref,
        "lora_params": adapter,
        "logprob_kernel": kernel,
        "activation_bytes_per_token_per_layer": per_token_layer,
        "parameters": on_device["parameters"],
        "gradients": on_device["gradients"],
        "optimizer": on_device["optimizer"],
        "reference": on_device["reference"],
        "offloaded_to_host": sum(v for k, v in states.items() if host[k]),
        "gathered": gathered,
        "activations": activations,
        "logprob": logprob,
        "context": context,
        "drafter": drafter["states"],
        "drafter_work": drafter["work"],
        "drafter_buffer_host": drafter["buffer"],
        "train_peak": train,
        "resident": resident,
        "generating": generating,
        "load": load,
        "host_load": whole if fsdp else 0,
        "peak": max(train, load, generating),
    }


def _drafter_memory(cfg, shape: ModelShape) -> dict[str, int]:
    """Per learner rank: the drafter replica's states, its training step's working memory and its host buffer
    (formulas in the module docstring); zeros without a drafter trained online."""
    d = cfg.drafter
    if d.mode == "off" or not d.train:
        return {"states": 0, "work": 0, "buffer": 0}
    ranks = cfg.learner.num_ranks
    h, v, q, k, inter = shape.hidden, shape.vocab, shape.q_dim, shape.kv_dim, shape.intermediate
    own = 2 * h * h + shape.layer_params()
    positions = _ceil_div(d.batch_size, ranks) * cfg.rollout.max_model_len
    per_position = 4 * (2 * q + 2 * k + 4 * inter) + 4 * h * 4 + 6 * h * 4
    loss = 4 * min(DRAFTER_CHUNK_BYTES, positions * v * 4)
    return {"states": 16 * own + 2 * v * h * DTYPE_BYTES[engine_dtype(cfg)], "work": positions * per_position + loss,
            "buffer": _ceil_div(d.buffer_tokens, ranks) * h * DTYPE_BYTES[d.buffer_dtype]}


def _engine_memory(cfg, shape: ModelShape, on_gpu: bool, gpu_bytes: float, host_bytes: float | None,
                   f: _Findings) -> dict[str, Any]:
    r = cfg.rollout
    e = DTYPE_BYTES[engine_dtype(cfg)]
    tp = r.tensor_parallel_size if on_gpu else 1
    p = shape.num_params()
    weights = _ceil_div(p * e, tp)
    lora = cfg.model.lora
    # vLLM's LoRA slots: max_loras (1) adapters of max_lora_rank on every projection it supports (all 7, whatever
    # the adapter targets), in the engine's dtype, split by tensor parallelism
    lora_slots = _ceil_div(shape.lora_params(lora.engine_max_rank(), ModelShape.LORA_MODULES) * e, tp) if lora else 0
    kv_per_token = 2 * shape.layers * _ceil_div(shape.kv_heads, tp) * shape.d * e
    ds = r.dynamic_sampling
    groups = cfg.kind.step_groups(cfg)
    per_round = (ds.prompts_per_round or groups) if ds.enabled else groups
    n = cfg.kind.step_group_size(cfg)
    seqs_per_engine = _ceil_div(per_round * n, r.num_engines)
    need_tokens = seqs_per_engine * r.max_model_len
    out: dict[str, Any] = {
        "dtype": engine_dtype(cfg),
        "tensor_parallel_size": tp,
        "weights": weights,
        "lora_slots": lora_slots,
        "kv_bytes_per_token": kv_per_token,
        "concurrent_sequences": seqs_per_engine,
        "concurrent_need_tokens": need_tokens,
    }
    if on_gpu:
        budget = int(r.gpu_memory_utilization * gpu_bytes)
        kv = budget - weights - lora_slots - ENGINE_OVERHEAD_BYTES
        out.update(budget=budget, overhead=ENGINE_OVERHEAD_BYTES, kv_cache=max(kv, 0),
                   kv_tokens=max(kv, 0) // kv_per_token, awake=budget, asleep=CUDA_CONTEXT_BYTES)
        key = "rollout.gpu_memory_utilization"
        if kv <= 0:
            lowest = (weights + lora_slots + ENGINE_OVERHEAD_BYTES + r.max_model_len * kv_per_token) / gpu_bytes
            f.error(key, f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} gives the engine "
                    f"{_gib(budget)} GiB, not more than its weights ({_gib(weights + lora_slots)} GiB) + "
                    f"~{_gib(ENGINE_OVERHEAD_BYTES)} GiB overhead: no room for a KV cache. Raise it above "
                    f"{math.ceil(lowest * 100) / 100}, or raise rollout.tensor_parallel_size")
        elif out["kv_tokens"] < r.max_model_len:
            f.error(key, f"the KV cache holds {out['kv_tokens']} tokens, less than one rollout.max_model_len="
                    f"{r.max_model_len} sequence (vLLM refuses to start); raise rollout.gpu_memory_utilization or "
                    "lower rollout.max_model_len")
        elif out["kv_tokens"] < need_tokens:
            f.notes.append(f"each engine's KV cache holds {_tokens(out['kv_tokens'])} tokens, "
                           f"{out['kv_tokens'] / need_tokens:.0%} of a round's {seqs_per_engine} sequences at full "
                           f"length ({_tokens(need_tokens)} tokens); vLLM queues the rest (more engines or a higher "
                           "rollout.gpu_memory_utilization generate more at once)")
    else:
        out.update(budget=None, kv_cache=None, kv_tokens=None)
        if host_bytes:
            reserve = int(r.gpu_memory_utilization * host_bytes)
            out.update(budget=reserve, kv_cache=max(reserve - weights - lora_slots, 0),
                       kv_tokens=max(reserve - weights - lora_slots, 0) // kv_per_token)
    return out


def _memory(cfg, shape: ModelShape, gpu_memory_gib: float, host_memory_gib: float | None, batch: dict[str, Any],
            f: _Findings) -> dict[str, Any]:
    lc, r, pc = cfg.learner, cfg.rollout, cfg.placement
    gpu_bytes = gpu_memory_gib * GIB
    host_bytes = host_memory_gib * GIB if host_memory_gib else None
    learner_gpu, engine_gpu = lc.num_gpus > 0, r.num_gpus_per_engine > 0
    tokens = batch["estimate_micro_batch_tokens"]
    lora = cfg.model.lora
    unknown = [m for m in lora.target_modules if m not in ModelShape.LORA_MODULES] if lora is not None else []
    if unknown:
        f.error("model.lora.target_modules", f"model.lora.target_modules {unknown}: not a linear layer of a "
                f"Qwen2-layout decoder (rl plan counts {list(ModelShape.LORA_MODULES)}); the adapters on them are "
                "not counted")
        cfg = cfg.model_copy(deep=True)
        cfg.model.lora.target_modules = [m for m in lora.target_modules if m in ModelShape.LORA_MODULES] or ["q_proj"]
    learner = _learner_memory(cfg, shape, learner_gpu, tokens)
    engine = _engine_memory(cfg, shape, engine_gpu, gpu_bytes, host_bytes, f)
    out: dict[str, Any] = {
        "gpu_memory_gib": gpu_memory_gib,
        "host_memory_gib": host_memory_gib,
        "learner": learner,
        "engine": engine,
        "device": "gpu" if (learner_gpu or engine_gpu) else "cpu",
    }
    if not learner_gpu and not engine_gpu:
        f.notes.append("CPU-only config (learner.num_gpus=0, rollout.num_gpus_per_engine=0): the per-GPU estimate "
                       "does not apply; the numbers are host RAM")
        engine_host = engine["weights"] + engine["lora_slots"] + (engine["kv_cache"] or 0)
        per_rank = learner["peak"] + learner["drafter_buffer_host"]
        out["host"] = {
            "per_learner_rank": per_rank,
            "per_engine_weights": engine["weights"],
            "per_engine_reserve": engine["budget"],
            "total_known": lc.num_ranks * per_rank + r.num_engines * engine_host,
        }
        return out

    # per-GPU peaks
    peaks: dict[str, int] = {}
    if pc.mode == "colocated" and learner_gpu and engine_gpu:
        if pc.engine_sleep_level == 0:
            peaks["colocated GPU"] = learner["peak"] + engine["awake"]
            phase = "both"
        else:
            training = max(learner["train_peak"], learner["load"]) + engine["asleep"]
            generating = learner["generating"] + engine["awake"]
            peaks["colocated GPU"] = max(training, generating)
            phase = "training" if training >= generating else "generating"
            out["colocated_phases"] = {"training": training, "generating": generating}
        starting = learner["load"] + engine["awake"]
        out["colocated_start"] = starting
        if learner["load"] > learner["resident"]:  # only then does start-up differ from the generating phase
            if starting > gpu_bytes:
                f.warn("placement.mode", _start_msg(learner, starting) + f", more than --gpu-memory-gib="
                       f"{gpu_memory_gib:g}: load the learner before the engines allocate their KV cache, or lower "
                       "rollout.gpu_memory_utilization")
            else:
                f.notes.append(_start_msg(learner, starting))
    else:
        phase = None
        if learner_gpu:
            peaks["learner GPU"] = learner["peak"]
        if engine_gpu:
            peaks["engine GPU"] = engine["awake"]
    out["per_gpu_peak"] = peaks
    out["peak"] = max(peaks.values())
    host = learner["offloaded_to_host"] + learner["drafter_buffer_host"]
    if pc.mode == "colocated" and pc.engine_sleep_level == 1 and engine_gpu:
        host += engine["weights"]
    out["host"] = {"per_learner_rank_offload": learner["offloaded_to_host"],
                   "per_learner_rank_drafter_buffer": learner["drafter_buffer_host"], "per_gpu_bundle": host}

    for where, peak in peaks.items():
        if peak <= gpu_bytes:
            continue
        fixes = [] if phase == "generating" else _learner_fixes(cfg, learner)
        if phase in ("generating", "both"):
            other, what = ((learner["generating"], "resident state") if phase == "generating"
                           else (learner["peak"], "peak"))
            room = max(math.floor((gpu_bytes - other) / gpu_bytes * 100) / 100, 0)
            fixes.append(f"rollout.gpu_memory_utilization (now {r.gpu_memory_utilization}; at most {room:.2f} leaves "
                         f"room for the learner's {what})")
        if phase == "both":
            fixes.append("placement.engine_sleep_level=2 (the engine frees its memory while the learner trains)")
        f.warn("memory", f"estimated {where} peak {_gib(peak)} GiB exceeds --gpu-memory-gib={gpu_memory_gib:g}"
               f"{_PHASES.get(phase, '')}; turn: " + "; ".join(fixes))
    return out


_PHASES = {"training": " (while the learner trains, engine asleep)", "generating": " (while the engine generates, "
           "learner state resident)", "both": " (engine awake while the learner trains: engine_sleep_level=0)"}


def _start_msg(learner: dict[str, Any], starting: int) -> str:
    return (f"at start-up each learner rank holds the whole model ({_size(learner['load'])}) before sharding it; if "
            f"its engine is awake then, the GPU holds {_size(starting)}")


def _learner_fixes(cfg, learner: dict[str, Any]) -> list[str]:
    lc = cfg.learner
    fixes = []
    big = sorted(((learner[k], k) for k in ("activations", "logprob", "gathered", "optimizer", "parameters",
                                             "drafter", "drafter_work")), reverse=True)
    fixes.append("largest parts: " + ", ".join(f"{k} {_gib(v)} GiB" for v, k in big[:3]))
    if lc.strategy == "single":
        fixes.append("learner.strategy=fsdp2 with more learner.num_ranks (shards parameters, gradients and AdamW "
                     "state)")
    else:
        fixes.append(f"learner.num_ranks (now {lc.num_ranks}; more ranks, smaller shards)")
    fixes.append(f"learner.micro_batch_tokens (now {lc.micro_batch_tokens}; activations scale with it)")
    if not lc.activation_checkpointing:
        fixes.append("learner.activation_checkpointing=true")
    if lc.strategy == "fsdp2" and not lc.fsdp.cpu_offload:
        fixes.append("learner.fsdp.cpu_offload=true")
    if lc.strategy == "deepspeed" and not lc.deepspeed.offload_optimizer:
        fixes.append("learner.deepspeed.offload_optimizer=true")
    if learner["logprob_kernel"] == "naive":
        fixes.append("learner.kernels.logprob=chunked (no [tokens x vocab] logits)")
    return fixes
