"""``rl plan``: check a recipe against a cluster and estimate its memory before anything is started.

    rl plan CONFIG [key=value ...] [--cluster-gpus N] [--nodes N] [--gpu-memory-gib 80] [--model-shape S] [--json]

Pure arithmetic on the config: nothing is loaded, no Ray cluster is contacted, no GPU is touched. The whole config
is first validated by :func:`rl.config.load_config` (its errors name the key); then come the checks that need the
numbers below, the batch arithmetic in words, and a per-GPU memory estimate. Exit code 0 when the plan has no
error, 1 otherwise; warnings fail only with ``--strict``.

Model shape
-----------
From ``--model-shape`` when given (a name below, or ``hidden=3584,layers=28,heads=28,kv_heads=4,
intermediate=18944,vocab=152064,tie=false``); else, for the embedded tiny model (``model.build_tiny``), from its
builder's shape; else from ``model.path/config.json`` when that directory is on this machine; else the last
component of ``model.path`` is looked up, case-insensitively and without an ``-Instruct`` suffix, in this table
(values from the models' published ``config.json``):

=============================== ====== ====== ===== ======== ============ ====== ====
name                            hidden layers heads kv heads intermediate vocab  tied
=============================== ====== ====== ===== ======== ============ ====== ====
Qwen2.5-0.5B                    896    24     14    2        4864         151936 yes
Qwen2.5-1.5B                    1536   28     12    2        8960         151936 yes
Qwen2.5-3B                      2048   36     16    2        11008        151936 yes
Qwen2.5-7B                      3584   28     28    4        18944        152064 no
Qwen2.5-Math-1.5B               1536   28     12    2        8960         151936 yes
Qwen2.5-Math-7B                 3584   28     28    4        18944        152064 no
DeepSeek-R1-Distill-Qwen-1.5B   1536   28     12    2        8960         151936 no
DeepSeek-R1-Distill-Qwen-7B     3584   28     28    4        18944        152064 no
=============================== ====== ====== ===== ======== ============ ====== ====

All are Qwen2 decoders: head dim hidden/heads, biases on q/k/v only, SwiGLU MLP, RMSNorm. A model whose shape
is unknown gets the checks and the batch arithmetic but no memory estimate (a warning).

Parameters
----------
With H hidden, L layers, V vocab, I intermediate, d head dim, q = heads*d, k = kv_heads*d::

    per layer  = H*q + q  (q proj + bias)  +  2*(H*k + k)  (k, v proj + biases)  +  q*H  (o proj)
               + 3*H*I  (gate, up, down)  +  2*H  (two RMSNorms)
    non-layer  = V*H (embedding)  +  V*H if untied (LM head)  +  H (final norm)
    P          = L * per layer + non-layer

Learner, per rank (bytes; b = bytes of learner.param_dtype, the master weights; c = bytes of model.dtype, the
compute dtype; N = learner.num_ranks under fsdp2 and deepspeed, 1 under single)
--------------------------------------------------------------------------------------------------------------
- parameters ``P*b/N``; gradients ``P*b/N`` (FSDP2 keeps the sharded gradient in the parameter's dtype);
  AdamW state ``2*P*b/N``: torch's AdamW keeps exp_avg and exp_avg_sq in the parameter dtype. With b = 4 and
  c = 2 (the default for a bf16 model.dtype) these are fp32 master weights, gradients and moments, 16 bytes per
  parameter; with b = c = 2 (pure bf16) 8 bytes, but AdamW then steps bf16 weights (a warning).
  DeepSpeed ZeRO-3 holds its module in the compute dtype and, in bf16/fp16, keeps fp32 master weights and fp32
  gradient partitions itself (whatever learner.param_dtype says): parameters ``P*c/N``, gradients ``4P/N``,
  optimizer ``12P/N``; its offload options move parameters, or gradients and optimizer state, to host RAM; its
  gathered parameters are counted like FSDP2's with resharding.
  The frozen reference policy (``algorithm.kl_coef > 0``) is held in the compute dtype: ``P*c/N``. With
  ``learner.fsdp.cpu_offload`` on a GPU run these four live in host memory instead.
- ``model.lora``: ``P_a = L * sum over model.lora.target_modules of r*(in + out)`` adapter parameters. The
  frozen base is held in the compute dtype and only the adapters train: parameters ``P*c/N + P_a*b/N``,
  gradients ``P_a*b/N``, AdamW state ``2*P_a*b/N`` (DeepSpeed in bf16/fp16: the adapters in c, with fp32
  gradient partitions ``4*P_a/N`` and masters + moments ``12*P_a/N``); under ``single`` with c < b autocast
  copies the adapters alone: ``P_a*c``.
- the compute copies of the parameters. FSDP2 gathered parameters (in the compute dtype): the root unit
  (embedding, LM head, final norm) stays gathered from forward through backward, two decoder layers are gathered
  at a time (the current one and the prefetched next), and the unsharded gradients of the root and of one layer
  exist before their reduce-scatter: ``c * (2*P_root + 3*P_layer)``. With ``reshard_after_forward: false`` every
  parameter stays gathered after the forward: ``c * (P + P_root + P_layer)``. Under ``single`` with c < b,
  autocast keeps a compute-dtype copy of the weights from the forward to the backward: ``P*c``; zero when c = b.
- loading: ``single`` loads the whole model onto its device (and a compute-dtype copy for the reference):
  ``P*b + [kl_coef > 0]*P*c``; ``fsdp2`` loads it into host memory and moves only its shard to the device, so its
  device load is the resident state (the whole model passes through each rank's host RAM once).
- activations of one micro-batch of T tokens, T = max(learner.micro_batch_tokens, rollout.max_model_len) (a
  sample longer than the budget gets a micro-batch of its own). Saved for backward per token and layer
  (flash/memory-efficient attention, no T^2 term)::

      A = c*(2*q + 2*k + 4*I) + 2*H*(2*c + f),   f = 4 when c < 4, else 0

  (q, k, v and the attention output; gate, up, silu(gate) and their product; each of the two RMSNorms keeps
  its input, its output and, in a 16-bit dtype, an fp32 copy). Without checkpointing ``T*L*A``; with
  ``learner.activation_checkpointing`` each layer keeps only its input and one layer is recomputed at a time:
  ``T*(L*H*c + A)``. These are estimates: real peaks depend on the attention backend and the allocator.
- log-prob peak (``learner.kernels.logprob``; ``auto`` is triton on CUDA and, on CPU, chunked once the fp32
  logits would exceed 256 MiB): ``naive`` holds the [T, V] logits in the compute dtype, their fp32 copy after
  the temperature and the fp32 log-softmax: ``T*V*(c + 8)``. The fused kernels (``chunked``, ``triton``) hold
  about 256 MiB of working buffers (two fp32 [chunk, V] buffers of ~128 MiB, or the fp32 hidden-state gradient)
  plus their fp32 LM-head gradient accumulator ``V*H*4``.
- a CUDA context of 0.5 GiB per process on a GPU.
- the speculative drafter (``drafter.mode`` not off and ``drafter.train``): every rank trains a replica,
  data-parallel. Its states stay allocated: its own weights ``P_d = 2*H*H (fc) + one decoder layer`` in fp32
  with their gradients and AdamW moments ``16*P_d``, and copies of the embedding and LM head in the engines'
  dtype (the weight export's) ``2*V*H*e``.
  Its training step (while the engines generate) holds, for ``S = ceil(drafter.batch_size / ranks)`` sequences
  of up to ``rollout.max_model_len`` tokens, the fp32 activations of one layer plus its inputs per position
  ``4*(2*q + 2*k + 4*I) + 4*H*4 + 6*H*4``, and about four fp32 ``[chunk, V]`` buffers of the token loss (chunks
  of 128 MiB of logits: ``4 * min(128 MiB, positions*V*4)``). Its buffer of hidden states is in host RAM:
  ``ceil(drafter.buffer_tokens / ranks) * H * bytes(drafter.buffer_dtype)``.

train peak = states on the device + gathered + activations + log-prob + context; resident between updates =
states on the device without the gradients + context (the learner frees its gradients at the end of each update
and returns its cached blocks to the device; DeepSpeed's gradient partitions are one persistent buffer and stay);
while the engines generate the learner holds its resident state plus the drafter's training step; the learner's
peak is the largest of the train peak, the load and that.

vLLM engine, per GPU (e = bytes of the engines' dtype: rollout.dtype, else model.dtype; tp =
rollout.tensor_parallel_size, G = --gpu-memory-gib)
------------------------------------------------------------------------------------------------------------
- weights ``P*e/tp``; vLLM claims ``gpu_memory_utilization * G`` in all; about 2 GiB of that go to its
  profiling run's activations, CUDA graphs and context (an estimate; it varies by model and version), the rest
  is KV cache: ``kv = u*G - P*e/tp - S - 2 GiB``.
- LoRA slots ``S`` (``model.lora``; 0 without): vLLM holds ``max_loras`` (1) adapters of ``max_lora_rank`` (the
  smallest vLLM value >= model.lora.rank) on every projection it supports, whatever the adapter targets:
  ``S = L * max_lora_rank * sum over the 7 projections of (in + out) * e / tp``.
- KV bytes per token on one GPU ``2 * L * ceil(kv_heads/tp) * d * e``; the cache holds ``kv / that`` tokens.
  It is compared with a step's concurrent need per engine, every sequence at full length:
  ``ceil(prompts per round * n / num_engines) * max_model_len`` (prompts per round: dynamic sampling's
  ``prompts_per_round``, else ``prompts_per_step``). Holding less is allowed (vLLM queues the rest); holding
  less than one ``max_model_len`` sequence is an error (vLLM refuses to start).

Per GPU peak
------------
- disaggregated: a learner GPU holds the learner's peak; an engine GPU ``u*G``.
- colocated, ``placement.engine_sleep_level`` 1 or 2: while the learner trains the sleeping engine keeps only
  its CUDA context (level 1 moves the weights to host memory, level 2 drops them; both drop the KV cache), and
  while the engine generates the learner's resident state stays (with the drafter's training step):
  ``max(learner peak + 0.5 GiB, learner while generating + u*G)``. Level 0 (no sleep): ``learner peak + u*G``.

On CPU-only configs (learner.num_gpus = 0 and rollout.num_gpus_per_engine = 0) the GPU estimate does not apply;
the same formulas give host RAM per learner rank, and each CPU engine reserves ``u`` of host RAM (or
``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache when that is set).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from typing import Any

from rl.placement import group_specs
from rl.plan.base import (  # noqa: F401  (KNOWN_SHAPES, TINY_SHAPES, parse_shape_spec: the package's API)
    KNOWN_SHAPES, TINY_SHAPES, ModelShape, PlanError, _Findings, engine_dtype, master_dtype, parse_shape_spec,
    resolve_shape,
)
from rl.plan.memory import _memory
from rl.plan.report import format_plan


def plan(cfg, *, cluster_gpus: int | None = None, nodes: int | None = None, gpu_memory_gib: float = 80.0,
         model_shape: str | None = None, host_memory_gib: float | None = None) -> dict[str, Any]:
    """The plan of a validated :class:`rl.config.Config` as a JSON-ready dict (see the module docstring)."""
    if cluster_gpus is not None and cluster_gpus < 1:
        raise PlanError(f"--cluster-gpus must be >= 1, got {cluster_gpus}")
    if nodes is not None and nodes < 1:
        raise PlanError(f"--nodes must be >= 1, got {nodes}")
    if gpu_memory_gib <= 0:
        raise PlanError(f"--gpu-memory-gib must be > 0, got {gpu_memory_gib}")
    f = _Findings()
    out: dict[str, Any] = {}
    shape, source = resolve_shape(cfg, model_shape)
    out["model"] = _model_section(cfg, shape, source, f)
    out["placement"] = _check_placement(cfg, shape, cluster_gpus, nodes, f)
    out["batch"] = _batch(cfg, f)
    if shape is not None:
        out["memory"] = _memory(cfg, shape, gpu_memory_gib, host_memory_gib, out["batch"], f)
    else:
        out["memory"] = None
    _check_async(cfg, f)
    out["errors"], out["warnings"], out["notes"] = f.errors, f.warnings, f.notes
    out["ok"] = not f.errors
    return out


def _model_section(cfg, shape: ModelShape | None, source: str, f: _Findings) -> dict[str, Any]:
    dtypes = _dtypes(cfg, f)
    if shape is None:
        f.warn("model.path", f"model shape unknown: {source}; the memory estimate is skipped. Pass --model-shape "
               "(a known name or hidden=..,layers=..,heads=..,kv_heads=..,intermediate=..,vocab=..,tie=..)")
        return {"name": cfg.model.path, "source": source, "shape": None, "params": None, "dtype": cfg.model.dtype,
                **dtypes}
    return {
        "name": shape.name,
        "source": source,
        "shape": asdict(shape) | {"head_dim": shape.d},
        "params": shape.num_params(),
        "params_per_layer": shape.layer_params(),
        "params_non_layer": shape.root_params(),
        "dtype": cfg.model.dtype,
        **dtypes,
    }


def _dtypes(cfg, f: _Findings) -> dict[str, str]:
    """The learner's master and compute dtypes and the engines' dtype; a pure-16-bit AdamW is warned about, and a
    16-bit param_dtype that differs from model.dtype (which the learner refuses) is an error."""
    lc, compute = cfg.learner, cfg.model.dtype
    master = master_dtype(cfg)
    if lc.strategy != "deepspeed" and lc.param_dtype != "float32":
        if lc.param_dtype != compute:
            f.error("learner.param_dtype", f"learner.param_dtype={lc.param_dtype} with model.dtype={compute}: 16-bit "
                    "parameters compute in their own dtype; set learner.param_dtype=float32 (fp32 master weights "
                    f"with {compute} compute) or model.dtype={lc.param_dtype}")
        else:
            f.warn("learner.param_dtype", f"learner.param_dtype={lc.param_dtype}: AdamW steps {lc.param_dtype} "
                   f"weights with no fp32 master copy; at learner.lr={lc.lr:g} most updates are smaller than half "
                   f"a {lc.param_dtype} step of the weight and are rounded away (the weights barely train). Set "
                   f"learner.param_dtype=float32 (fp32 master weights and AdamW state, {compute} compute, "
                   f"{engine_dtype(cfg)} engines)")
    return {"master_dtype": master, "compute_dtype": compute, "engine_dtype": engine_dtype(cfg)}


def _gpu_counts(cfg) -> dict[str, Any]:
    lc, r, mode = cfg.learner, cfg.rollout, cfg.placement.mode
    learner = lc.num_ranks * lc.num_gpus
    engines = r.num_engines * r.num_gpus_per_engine
    total = max(learner, engines) if mode == "colocated" else learner + engines
    return {"mode": mode, "learner_gpus": learner, "engine_gpus": engines, "total_gpus": math.ceil(total - 1e-9)}


def _check_placement(cfg, shape: ModelShape | None, cluster_gpus: int | None, nodes: int | None,
                     f: _Findings) -> dict[str, Any]:
    lc, r, pc = cfg.learner, cfg.rollout, cfg.placement
    counts = _gpu_counts(cfg)
    need = counts["total_gpus"]
    counts["cluster_gpus"] = cluster_gpus
    counts["nodes"] = nodes
    on_gpu = lc.num_gpus > 0 or r.num_gpus_per_engine > 0
    counts["device"] = "gpu" if on_gpu else "cpu"

    # tensor parallelism must match the engine's GPUs
    tp, g = r.tensor_parallel_size, r.num_gpus_per_engine
    if g >= 1 and tp != g:
        f.error("rollout.tensor_parallel_size",
                f"rollout.tensor_parallel_size={tp} but rollout.num_gpus_per_engine={g:g}: an engine shards its model "
                f"over exactly its GPUs; set rollout.tensor_parallel_size={g:g} (or num_gpus_per_engine={tp})")
    elif 0 < g < 1:
        if tp != 1:
            f.error("rollout.tensor_parallel_size",
                    f"rollout.num_gpus_per_engine={g:g} is a share of one GPU, so rollout.tensor_parallel_size must be "
                    f"1 (got {tp}); or give each engine {tp} whole GPUs")
        elif pc.mode == "disaggregated":
            f.notes.append(f"rollout.num_gpus_per_engine={g:g}: {round(1 / g)} engines share a GPU; their "
                           "gpu_memory_utilization shares must add up to at most 1")
    elif g == 0 and tp > 1:
        f.warn("rollout.tensor_parallel_size",
               f"rollout.tensor_parallel_size={tp} with CPU engines (rollout.num_gpus_per_engine=0); set it to 1")
    if shape is not None and g >= 1 and tp > 1 and shape.heads % tp:
        f.error("rollout.tensor_parallel_size",
                f"{shape.heads} attention heads do not split over rollout.tensor_parallel_size={tp}; use a divisor of "
                f"{shape.heads}")
    if lc.num_gpus > 1:
        f.warn("learner.num_gpus", f"learner.num_gpus={lc.num_gpus:g}: a learner rank uses one GPU, the others stay "
               f"idle; set learner.num_gpus=1 and learner.num_ranks={lc.num_ranks * math.ceil(lc.num_gpus)} "
               "(learner.strategy=fsdp2)")
    if pc.mode == "colocated" and (lc.num_gpus > 0) != (r.num_gpus_per_engine > 0):
        f.warn("placement.mode", "placement.mode=colocated with the learner and the engines on different device kinds "
               f"(learner.num_gpus={lc.num_gpus:g}, rollout.num_gpus_per_engine={r.num_gpus_per_engine:g}); give both "
               "GPUs or neither")
    if pc.mode == "colocated" and on_gpu and pc.engine_sleep_level == 0:
        f.notes.append("placement.engine_sleep_level=0: the engine keeps its weights and KV cache while the learner "
                       "trains, so both must fit on each GPU at once")
    if pc.mode == "colocated" and not on_gpu:
        f.notes.append("colocated on CPU: vLLM's CPU build has no sleep mode, engines and learner ranks share the "
                       "host")

    if cluster_gpus is not None and need > cluster_gpus:
        alt = ""
        if pc.mode == "disaggregated" and lc.num_ranks == r.num_engines and lc.num_gpus <= 1 and g <= 1:
            alt = f", or placement.mode=colocated (needs {_gpu_counts_colocated(cfg)})"
        f.error("learner.num_ranks / rollout.num_engines",
                f"the recipe needs {need} GPUs ({_describe_need(cfg)}) but --cluster-gpus={cluster_gpus}; lower "
                f"learner.num_ranks or rollout.num_engines{alt}")
    elif cluster_gpus is not None and need < cluster_gpus:
        f.notes.append(f"{cluster_gpus - need} of the cluster's {cluster_gpus} GPUs stay idle")
    elif cluster_gpus is None and on_gpu:
        f.notes.append(f"needs {need} GPUs; pass --cluster-gpus to check them against the cluster"
                       + (" (ray.address is set: rl plan does not connect)" if cfg.ray.address else ""))

    if nodes is not None:
        if cluster_gpus is None:
            raise PlanError("--nodes needs --cluster-gpus (the GPUs of all nodes together)")
        if cluster_gpus % nodes:
            raise PlanError(f"--cluster-gpus={cluster_gpus} is not a multiple of --nodes={nodes}")
        per_node = cluster_gpus // nodes
        counts["gpus_per_node"] = per_node
        if g > per_node:
            f.error("rollout.num_gpus_per_engine",
                    f"an engine's {g:g} GPUs must sit on one node, which has {per_node}; lower "
                    "rollout.num_gpus_per_engine and rollout.tensor_parallel_size")
        # the strategy applies to each placement group on its own (rl.placement: [colocated] or [learner, engine])
        for spec in group_specs(cfg):
            gpus = sum(b.get("GPU", 0) for b in spec.bundles)
            if pc.strategy == "STRICT_PACK" and gpus > per_node:
                f.error("placement.strategy", f"placement.strategy=STRICT_PACK puts every bundle of the {spec.name} "
                        f"group on one node, but it needs {gpus:g} GPUs and a node has {per_node}; use PACK or SPREAD")
            if pc.strategy == "STRICT_SPREAD" and len(spec.bundles) > nodes:
                f.error("placement.strategy", f"placement.strategy=STRICT_SPREAD puts each of the {spec.name} "
                        f"group's {len(spec.bundles)} bundles on its own node, but there are {nodes}; use PACK or "
                        "SPREAD")
        if lc.num_ranks * lc.num_gpus > per_node and lc.strategy != "single":
            f.notes.append(f"the {lc.num_ranks} learner ranks span more than one node: FSDP2's all-gather and "
                           "reduce-scatter cross the inter-node network every layer")
    return counts


def _gpu_counts_colocated(cfg) -> int:
    lc, r = cfg.learner, cfg.rollout
    return math.ceil(max(lc.num_ranks * lc.num_gpus, r.num_engines * r.num_gpus_per_engine) - 1e-9)


def _describe_need(cfg) -> str:
    lc, r = cfg.learner, cfg.rollout
    learner = f"{lc.num_ranks} learner ranks x {lc.num_gpus:g}"
    engines = f"{r.num_engines} engines x {r.num_gpus_per_engine:g}"
    if cfg.placement.mode == "colocated":
        return f"colocated: max({learner}, {engines})"
    return f"disaggregated: {learner} + {engines}"


def _batch(cfg, f: _Findings) -> dict[str, Any]:
    r, lc, kind = cfg.rollout, cfg.learner, cfg.kind
    groups, group_size, unit = kind.step_groups(cfg), kind.step_group_size(cfg), kind.sample_unit
    samples = groups * group_size
    n_mini = lc.mini_batches_per_step
    mini = samples // n_mini
    groups_per_mini = groups // n_mini
    ranks = lc.num_ranks
    per_rank = mini / ranks
    response_len = kind.response_tokens(cfg)
    prompt_len = r.max_model_len - response_len
    mb_tokens = max(lc.micro_batch_tokens, r.max_model_len)
    mb_per_rank = math.ceil(math.ceil(per_rank) * r.max_model_len / mb_tokens) if per_rank else 0
    opt_steps = n_mini * lc.epochs_per_step

    first = kind.plan_shape(cfg, prompt_len, response_len)
    mini_txt = (f"{n_mini} mini-batch{'es' if n_mini > 1 else ''} of {mini} {unit} ({groups_per_mini} whole groups)"
                f"{f' x {lc.epochs_per_step} epochs' if lc.epochs_per_step > 1 else ''} = {opt_steps} optimizer "
                f"step{'s' if opt_steps > 1 else ''} per RL step")
    rank_txt = (f"{f'each of {ranks} learner ranks' if ranks > 1 else 'the learner rank'} gets "
                f"{'~' if mini % ranks else ''}{per_rank:g} {unit} per mini-batch, cut into micro-batches of <= "
                f"{lc.micro_batch_tokens} tokens (about {mb_per_rank} at full length)")
    summary = f"{first}; {mini_txt}; {rank_txt}"
    ds = r.dynamic_sampling
    if ds.enabled:
        per_round = ds.prompts_per_round or r.prompts_per_step
        summary += (f". Dynamic sampling generates rounds of {per_round} prompts x {group_size} = "
                    f"{per_round * group_size} responses, at most {ds.max_rounds} rounds, until {groups} groups vary")
    if note := kind.plan_note(cfg):
        summary += f". {note}"
    if cfg.gdro.rollout_gdro:
        summary += f". Rollout-GDRO varies the samples per prompt around a mean of {cfg.gdro.n_mean}"

    # ranks vs the mini-batch
    key = "learner.num_ranks"
    if mini < ranks:
        f.error(key, f"a mini-batch of {mini} {unit} cannot be split over learner.num_ranks={ranks}: "
                f"{ranks - mini} rank(s) would get nothing and run only padding micro-batches. Lower learner.num_ranks "
                f"to <= {mini}, or lower learner.mini_batches_per_step (to <= {max(1, samples // ranks)}), or raise "
                "rollout.prompts_per_step / rollout.num_samples_per_prompt")
    elif mini % ranks:
        f.warn(key, f"a mini-batch of {mini} {unit} splits unevenly over {ranks} ranks ({mini // ranks} or "
               f"{mini // ranks + 1} each): ranks with fewer micro-batches run padding passes; choose "
               f"learner.num_ranks dividing {mini}, or adjust rollout.prompts_per_step / learner.mini_batches_per_step")
    if ds.enabled and ranks > 1:
        f.notes.append("dynamic sampling may end a step with fewer groups than rollout.prompts_per_step (max_rounds "
                       "cap), which shrinks the mini-batches each rank gets")
    if lc.micro_batch_tokens < r.max_model_len:
        f.notes.append(f"learner.micro_batch_tokens={lc.micro_batch_tokens} < rollout.max_model_len="
                       f"{r.max_model_len}: a longer sample gets a micro-batch of its own, so the estimate uses "
                       f"{mb_tokens} tokens per micro-batch")
    return {
        "unit": unit,
        "groups_per_step": groups,
        "group_size": group_size,
        "samples_per_step": samples,
        "max_prompt_tokens": prompt_len,
        "max_response_tokens": response_len,
        "max_tokens_per_step": samples * r.max_model_len,
        "mini_batches_per_step": n_mini,
        "samples_per_mini_batch": mini,
        "groups_per_mini_batch": groups_per_mini,
        "optimizer_steps_per_rl_step": opt_steps,
        "num_ranks": ranks,
        "samples_per_rank_per_mini_batch": per_rank,
        "micro_batch_tokens": lc.micro_batch_tokens,
        "estimate_micro_batch_tokens": mb_tokens,
        "micro_batches_per_rank_at_full_length": mb_per_rank,
        "summary": summary,
    }


def _check_async(cfg, f: _Findings) -> None:
    a = cfg.async_mode
    if not a.enabled:
        return
    f.notes.append(f"async_mode: step t+1 is generated while the learner trains step t; rollouts lag the policy by "
                   f"at most {a.max_off_policy_steps} version(s), corrected by truncated importance sampling "
                   f"(cap {a.tis_cap:g})")
    if cfg.learner.old_logprob_source == "engine":
        f.warn("learner.old_logprob_source", "async_mode.enabled with learner.old_logprob_source=engine: pi_old is "
               "then the stale behaviour policy, so the importance weight pi_old/pi_behaviour is 1 and the lag goes "
               "uncorrected; set learner.old_logprob_source=learner")


# ---------------------------------------------------------------------------------------------------- CLI
def add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="check a recipe against a cluster and estimate its memory (rl plan CONFIG --cluster-gpus 8)",
        description="Validate a recipe, check its GPU count and batch arithmetic, and estimate per-GPU memory of the "
        "learner and the vLLM engines. Starts nothing. Exit code 0 without errors, 1 with errors (or with warnings "
        "under --strict).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", nargs="?", default=None, help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.num_ranks=8")
    p.add_argument("--cluster-gpus", type=int, default=None, help="GPUs in the Ray cluster (all nodes)")
    p.add_argument("--nodes", type=int, default=None, help="nodes the GPUs are spread over (needs --cluster-gpus)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    p.add_argument("--host-memory-gib", type=float, default=None, help="host RAM per node (CPU engines' KV share)")
    p.add_argument("--model-shape", default=None,
                   help="a known model name (e.g. Qwen2.5-Math-7B) or hidden=..,layers=..,heads=..,kv_heads=..,"
                   "intermediate=..,vocab=..,tie=.. when model.path is not on this machine")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--strict", action="store_true", help="warnings fail too (exit code 1)")
    p.set_defaults(func=plan_main)


def plan_main(args: argparse.Namespace) -> int:
    from rl.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail(args, str(e), key="config")
    try:
        result = plan(cfg, cluster_gpus=args.cluster_gpus, nodes=args.nodes, gpu_memory_gib=args.gpu_memory_gib,
                      model_shape=args.model_shape, host_memory_gib=args.host_memory_gib)
    except PlanError as e:
        return _fail(args, str(e), key="flags")
    result["config"] = args.config
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_plan(result, args.config))
    if not result["ok"]:
        return 1
    return 1 if args.strict and result["warnings"] else 0


def _fail(args: argparse.Namespace, message: str, key: str) -> int:
    if args.json:
        print(json.dumps({"config": args.config, "ok": False, "errors": [{"key": key, "message": message}],
                          "warnings": [], "notes": []}, indent=1))
    else:
        print(f"rl plan: {message}", file=sys.stderr)
    return 1
