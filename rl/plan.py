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
  is KV cache: ``kv = u*G - P*e/tp - 2 GiB``.
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
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rl.placement import group_specs

GIB = 1 << 30
MIB = 1 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_BYTES = GIB // 2
ENGINE_OVERHEAD_BYTES = 2 * GIB
FUSED_BUFFER_BYTES = 256 * MIB
DRAFTER_CHUNK_BYTES = 128 * MIB  # rollout.drafter.train.DrafterLossConfig.chunk_bytes
AUTO_CPU_LOGITS_BYTES = 256 * MIB  # trainers.learner: CPU `auto` switches to chunked above this


@dataclass(frozen=True)
class ModelShape:
    """A dense decoder's shape (Qwen2 layout: q/k/v biases, SwiGLU MLP, RMSNorm)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    head_dim: int | None = None
    qkv_bias: bool = True

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.d

    def layer_params(self) -> int:
        h, q, k = self.hidden, self.q_dim, self.kv_dim
        bias = (q + 2 * k) if self.qkv_bias else 0
        return h * q + 2 * h * k + q * h + bias + 3 * h * self.intermediate + 2 * h

    def root_params(self) -> int:
        """Everything outside the decoder layers: embedding, LM head when untied, final norm."""
        return self.vocab * self.hidden * (1 if self.tie else 2) + self.hidden

    def num_params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def describe(self) -> str:
        return (f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads / {self.kv_heads} KV heads "
                f"(dim {self.d}), MLP {self.intermediate}, vocab {self.vocab}, {'tied' if self.tie else 'untied'}")


def _qwen2(name: str, hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tie: bool) -> ModelShape:
    return ModelShape(name, hidden, layers, heads, kv, inter, vocab, tie)


KNOWN_SHAPES: dict[str, ModelShape] = {
    s.name.lower(): s
    for s in (
        _qwen2("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True),
        _qwen2("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True),
        _qwen2("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True),
        _qwen2("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False),
        _qwen2("Qwen2.5-Math-1.5B", 1536, 28, 12, 2, 8960, 151936, True),
        _qwen2("Qwen2.5-Math-7B", 3584, 28, 28, 4, 18944, 152064, False),
        _qwen2("DeepSeek-R1-Distill-Qwen-1.5B", 1536, 28, 12, 2, 8960, 151936, False),
        _qwen2("DeepSeek-R1-Distill-Qwen-7B", 3584, 28, 28, 4, 18944, 152064, False),
    )
}

# The embedded tiny models (trainers/tiny_model.py: tiny_qwen2_config): vocab is at most the tokenizer's target
# size (arith 320, dccot_sum 360), so these are upper bounds.
TINY_SHAPES = {
    "arith": ModelShape("tiny (arith)", 128, 4, 2, 2, 512, 320, True, head_dim=64),
    "dccot_sum": ModelShape("tiny (dccot_sum)", 128, 4, 2, 2, 512, 360, True, head_dim=64),
}

_SPEC_KEYS = {"hidden": int, "layers": int, "heads": int, "kv_heads": int, "intermediate": int, "vocab": int,
              "tie": bool, "head_dim": int, "qkv_bias": bool}


class PlanError(ValueError):
    """A flag of ``rl plan`` itself that cannot be used (not a problem of the recipe)."""


def parse_shape_spec(spec: str) -> ModelShape:
    """A name of :data:`KNOWN_SHAPES` or ``hidden=..,layers=..,heads=..,kv_heads=..,intermediate=..,vocab=..,
    tie=true|false`` (optional ``head_dim``, ``qkv_bias``)."""
    known = KNOWN_SHAPES.get(_normalize_name(spec))
    if known is not None:
        return known
    if "=" not in spec:
        names = ", ".join(s.name for s in KNOWN_SHAPES.values())
        raise PlanError(f"--model-shape {spec!r}: not a known model ({names}) "
                        "and not of the form hidden=..,layers=..,heads=..,kv_heads=..,intermediate=..,vocab=..,tie=..")
    values: dict[str, Any] = {}
    for part in spec.split(","):
        key, _, raw = part.partition("=")
        key = key.strip()
        if key not in _SPEC_KEYS:
            raise PlanError(f"--model-shape: unknown key {key!r} (valid: {', '.join(_SPEC_KEYS)})")
        if _SPEC_KEYS[key] is bool:
            if raw.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise PlanError(f"--model-shape: {key}={raw!r} is not true/false")
            values[key] = raw.strip().lower() in ("true", "1", "yes")
        else:
            try:
                values[key] = int(raw)
            except ValueError:
                raise PlanError(f"--model-shape: {key}={raw!r} is not an integer") from None
    missing = [k for k in ("hidden", "layers", "heads", "intermediate", "vocab", "tie") if k not in values]
    if missing:
        raise PlanError(f"--model-shape: missing {', '.join(missing)}")
    values.setdefault("kv_heads", values["heads"])
    return ModelShape(name="--model-shape", **values)


def shape_from_hf_config(cfg: dict, name: str) -> tuple[ModelShape | None, str | None]:
    """The shape from a transformers ``config.json`` dict, or (None, why) when it is not a dense decoder."""
    if any(k in cfg for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return None, "a mixture-of-experts model (not modelled)"
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        return None, f"config.json has no {', '.join(missing)}"
    qwen2 = str(cfg.get("model_type", "")).lower() == "qwen2"
    return ModelShape(
        name=name,
        hidden=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=int(cfg["num_attention_heads"]),
        kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        intermediate=int(cfg["intermediate_size"]),
        vocab=int(cfg["vocab_size"]),
        tie=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
        qkv_bias=True if qwen2 else bool(cfg.get("attention_bias", False)),
    ), None


def _normalize_name(name: str) -> str:
    name = name.strip().rstrip("/").lower()
    return re.sub(r"-instruct$", "", name)


def resolve_shape(cfg, spec: str | None) -> tuple[ModelShape | None, str]:
    """(shape or None, where it came from or why it is unknown)."""
    if spec:
        shape = parse_shape_spec(spec)
        return shape, "--model-shape"
    if cfg.model.path is None:
        return TINY_SHAPES[cfg.model.tiny.task], "the embedded tiny model's builder"
    path = Path(cfg.model.path)
    config_json = path / "config.json"
    if config_json.is_file():
        try:
            data = json.loads(config_json.read_text())
        except (OSError, ValueError) as e:
            return None, f"{config_json} could not be read ({e})"
        shape, why = shape_from_hf_config(data, path.name)
        return shape, (f"{path.name}/config.json" if shape else f"{path.name}/config.json: {why}")
    known = KNOWN_SHAPES.get(_normalize_name(path.name))
    if known is not None:
        return known, "the known-shapes table (model.path is not on this machine)"
    return None, (f"model.path {cfg.model.path!r} is not on this machine and {path.name!r} is not in the known-shapes "
                  "table")


# ---------------------------------------------------------------------------------------------------- the plan
class _Findings:
    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []
        self.warnings: list[dict[str, str]] = []
        self.notes: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append({"key": key, "message": message})

    def warn(self, key: str, message: str) -> None:
        self.warnings.append({"key": key, "message": message})


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(n: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB or n == 0 else f"{n / MIB:.1f} MiB"


def _tokens(n: int) -> str:
    return f"{n:,}"


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


def engine_dtype(cfg) -> str:
    """The engines' weights dtype: rollout.dtype, else model.dtype."""
    return cfg.rollout.dtype or cfg.model.dtype


def master_dtype(cfg) -> str:
    """The dtype the learner's optimizer steps: DeepSpeed keeps fp32 masters of a 16-bit module itself."""
    return "float32" if cfg.learner.strategy == "deepspeed" else cfg.learner.param_dtype


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
    r, lc = cfg.rollout, cfg.learner
    mt = cfg.multiturn
    if mt.env is not None:
        groups, group_size = mt.groups_per_step, mt.group_size
        unit = "episodes"
    else:
        groups, group_size = r.prompts_per_step, r.num_samples_per_prompt
        unit = "responses"
    samples = groups * group_size
    n_mini = lc.mini_batches_per_step
    mini = samples // n_mini
    groups_per_mini = groups // n_mini
    ranks = lc.num_ranks
    per_rank = mini / ranks
    response_len = cfg.dccot.context_tokens if cfg.dccot is not None else r.max_response_tokens
    prompt_len = r.max_model_len - response_len
    mb_tokens = max(lc.micro_batch_tokens, r.max_model_len)
    mb_per_rank = math.ceil(math.ceil(per_rank) * r.max_model_len / mb_tokens) if per_rank else 0
    opt_steps = n_mini * lc.epochs_per_step

    if mt.env is not None:
        first = (f"Each step: {groups} groups x {group_size} episodes = {samples} episodes of up to {mt.max_turns} "
                 f"turns (one training sample per turn, so {samples} to {samples * mt.max_turns} samples), each turn "
                 f"up to {r.max_model_len} tokens")
    else:
        first = (f"Each step: {groups} prompts x {group_size} samples = {samples} responses, up to {samples} x "
                 f"(prompt {prompt_len} + response {response_len}) tokens")
    mini_txt = (f"{n_mini} mini-batch{'es' if n_mini > 1 else ''} of {mini} {unit} ({groups_per_mini} whole groups)"
                f"{f' x {lc.epochs_per_step} epochs' if lc.epochs_per_step > 1 else ''} = {opt_steps} optimizer "
                f"step{'s' if opt_steps > 1 else ''} per RL step")
    rank_txt = (f"{f'each of {ranks} learner ranks' if ranks > 1 else 'the learner rank'} gets "
                f"{'~' if mini % ranks else ''}{per_rank:g} {unit} per mini-batch, cut into micro-batches of <= "
                f"{lc.micro_batch_tokens} tokens (about {mb_per_rank} at full length)")
    summary = f"{first}; {mini_txt}; {rank_txt}"
    ds = r.dynamic_sampling
    if ds.enabled and mt.env is None:
        per_round = ds.prompts_per_round or r.prompts_per_step
        summary += (f". Dynamic sampling generates rounds of {per_round} prompts x {group_size} = "
                    f"{per_round * group_size} responses, at most {ds.max_rounds} rounds, until {groups} groups vary")
    if cfg.dccot is not None:
        summary += (". DC-CoT: each response is a director trajectory with parallel workers, trained as its "
                    "director thread and every worker (more samples than responses)")
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
    if ds.enabled and ranks > 1 and mt.env is None:
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
    if ds and b < 4:  # ZeRO-3 in bf16/fp16 keeps fp32 gradient partitions and fp32 master weights beside AdamW
        states["gradients"] = _ceil_div(p * 4, n)
        states["optimizer"] = _ceil_div(3 * p * 4, n)
    if ds:
        host = {"parameters": lc.deepspeed.offload_params, "reference": lc.deepspeed.offload_params,
                "gradients": lc.deepspeed.offload_optimizer, "optimizer": lc.deepspeed.offload_optimizer}
    else:
        host = dict.fromkeys(states, fsdp and lc.fsdp.cpu_offload)
    host = {k: bool(v and on_gpu) for k, v in host.items()}
    offload = any(host.values())
    on_device = {k: (0 if host[k] else v) for k, v in states.items()}
    if not fsdp:
        gathered = p * c if c < b else 0  # autocast's compute-dtype copies of the weights, forward to backward
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
    whole = p * b + (p * c if ref else 0)
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
    kv_per_token = 2 * shape.layers * _ceil_div(shape.kv_heads, tp) * shape.d * e
    ds = r.dynamic_sampling
    per_round = (ds.prompts_per_round or r.prompts_per_step) if ds.enabled else r.prompts_per_step
    if cfg.multiturn.env is not None:
        per_round = cfg.multiturn.groups_per_step
        n = cfg.multiturn.group_size
    else:
        n = r.num_samples_per_prompt
    seqs_per_engine = _ceil_div(per_round * n, r.num_engines)
    need_tokens = seqs_per_engine * r.max_model_len
    out: dict[str, Any] = {
        "dtype": engine_dtype(cfg),
        "tensor_parallel_size": tp,
        "weights": weights,
        "kv_bytes_per_token": kv_per_token,
        "concurrent_sequences": seqs_per_engine,
        "concurrent_need_tokens": need_tokens,
    }
    if on_gpu:
        budget = int(r.gpu_memory_utilization * gpu_bytes)
        kv = budget - weights - ENGINE_OVERHEAD_BYTES
        out.update(budget=budget, overhead=ENGINE_OVERHEAD_BYTES, kv_cache=max(kv, 0),
                   kv_tokens=max(kv, 0) // kv_per_token, awake=budget, asleep=CUDA_CONTEXT_BYTES)
        key = "rollout.gpu_memory_utilization"
        if kv <= 0:
            lowest = (weights + ENGINE_OVERHEAD_BYTES + r.max_model_len * kv_per_token) / gpu_bytes
            f.error(key, f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} gives the engine "
                    f"{_gib(budget)} GiB, not more than its weights ({_gib(weights)} GiB) + "
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
            out.update(budget=reserve, kv_cache=max(reserve - weights, 0),
                       kv_tokens=max(reserve - weights, 0) // kv_per_token)
    return out


def _memory(cfg, shape: ModelShape, gpu_memory_gib: float, host_memory_gib: float | None, batch: dict[str, Any],
            f: _Findings) -> dict[str, Any]:
    lc, r, pc = cfg.learner, cfg.rollout, cfg.placement
    gpu_bytes = gpu_memory_gib * GIB
    host_bytes = host_memory_gib * GIB if host_memory_gib else None
    learner_gpu, engine_gpu = lc.num_gpus > 0, r.num_gpus_per_engine > 0
    tokens = batch["estimate_micro_batch_tokens"]
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
        engine_host = engine["weights"] + (engine["kv_cache"] or 0)
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


# ---------------------------------------------------------------------------------------------------- output
def format_plan(result: dict[str, Any], config_name: str | None = None) -> str:
    """The plan as text: model, placement, the batch in words, the memory table, errors, warnings, notes."""
    lines: list[str] = [f"rl plan: {config_name or '(defaults)'}"]
    add = lines.append
    m = result["model"]
    if m["shape"] is not None:
        s = ModelShape(**m["shape"])
        add(_wrap(f"model: {m['name']}, {_fmt_count(m['params'])} parameters ({s.describe()}; "
                  f"shape from {m['source']})", "  ", first=""))
    else:
        add(_wrap(f"model: {m['name']}, shape unknown ({m['source']})", "  ", first=""))
    add(_wrap(_describe_dtypes(m), "  ", first=""))
    pl = result["placement"]
    if pl["device"] == "gpu":
        cluster = f" of the cluster's {pl['cluster_gpus']}" if pl["cluster_gpus"] is not None else ""
        nodes = f" on {pl['nodes']} nodes" if pl.get("nodes") else ""
        add(f"placement: {pl['mode']} ({_describe_need_from(pl)}) -> {pl['total_gpus']} GPUs{cluster}{nodes}")
    else:
        add(f"placement: {pl['mode']}, CPU only")
    add("")
    add(_wrap(result["batch"]["summary"] + ".", "  ", first=""))
    mem = result["memory"]
    if mem is not None:
        add("")
        lines.extend(_memory_table(mem))
    for title, items in (("ERRORS", result["errors"]), ("warnings", result["warnings"])):
        if items:
            add("")
            add(f"{title}:")
            for it in items:
                add(_wrap(f"- [{it['key']}] {it['message']}", "  ", first=""))
    if result["notes"]:
        add("")
        add("notes:")
        for note in result["notes"]:
            add(_wrap(f"- {note}", "  ", first=""))
    add("")
    add("plan: " + ("OK" if result["ok"] else f"{len(result['errors'])} error(s)")
        + (f", {len(result['warnings'])} warning(s)" if result["warnings"] else ""))
    return "\n".join(lines)


def _describe_dtypes(m: dict[str, Any]) -> str:
    master, compute = m["master_dtype"], m["compute_dtype"]
    learner = (f"{master} parameters and AdamW state, computing in {compute}" if master == compute
               else f"{master} master weights and AdamW state, {compute} compute")
    return f"dtypes: learner {learner}; engines {m['engine_dtype']}"


def _describe_need_from(pl: dict[str, Any]) -> str:
    return f"learner {pl['learner_gpus']:g} GPUs, engines {pl['engine_gpus']:g} GPUs"


def _wrap(text: str, indent: str, first: str | None = None, width: int = 110) -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent=indent if first is None else first,
                         subsequent_indent=indent, break_on_hyphens=False)


def _memory_table(mem: dict[str, Any]) -> list[str]:
    lr, en = mem["learner"], mem["engine"]
    gpu = mem["device"] == "gpu"
    rows: list[tuple[str, str]] = []
    shard = f" (1/{lr['shards']} shard)" if lr["shards"] > 1 else ""
    where = "per GPU" if lr["context"] else "host RAM"
    rows.append((f"learner rank ({lr['strategy']}, log-prob kernel {lr['logprob_kernel']}), {where}", ""))
    master, compute = lr["master_dtype"], lr["compute_dtype"]
    ds = lr["strategy"] == "deepspeed"
    zero_masters = ds and master != compute  # ZeRO-3 keeps the fp32 masters beside its 16-bit module
    labels = (("parameters", f"parameters, {compute}" if zero_masters
               else f"parameters, {master}{' masters' if master != compute else ''}"),
              ("gradients", f"gradients, {'float32 partitions' if zero_masters else master}"),
              ("optimizer", f"AdamW state, {'float32 masters + ' if zero_masters else ''}{master} moments"),
              ("reference", f"reference policy, {compute}"))
    for key, label in labels:
        if key == "reference" and not lr["reference_policy"]:
            continue
        rows.append((f"  {label}{shard}", "in host RAM" if lr["cpu_offload"] and not lr[key] else _size(lr[key])))
    if lr["offloaded_to_host"]:
        rows.append(("  (host RAM, offloaded)", _size(lr["offloaded_to_host"])))
    if lr["strategy"] in ("fsdp2", "deepspeed"):
        rows.append((f"  gathered units + their gradients ({compute})", _size(lr["gathered"])))
    elif lr["gathered"]:
        rows.append((f"  {compute} compute copies (autocast)", _size(lr["gathered"])))
    rows.append(("  activations of one micro-batch", _size(lr["activations"])))
    rows.append(("  log-prob peak", _size(lr["logprob"])))
    if lr["drafter"]:
        rows.append(("  drafter replica (fp32, AdamW, embedding + head)", _size(lr["drafter"])))
        rows.append(("  drafter training step (engines generating)", _size(lr["drafter_work"])))
        rows.append(("  (host RAM, drafter buffer)", _size(lr["drafter_buffer_host"])))
    if lr["context"]:
        rows.append(("  CUDA context", _size(lr["context"])))
    rows.append(("  train peak", _size(lr["train_peak"])))
    if lr["load"] > lr["resident"]:
        rows.append(("  at load (whole model on the device)", _size(lr["load"])))
    rows.append(("  resident between updates", _size(lr["resident"])))
    if lr["drafter"]:
        rows.append(("  while the engines generate", _size(lr["generating"])))
    tp = f", TP {en['tensor_parallel_size']}" if en["tensor_parallel_size"] > 1 else ""
    rows.append((f"engine ({en['dtype']} weights{tp}), {'per GPU' if en.get('awake') is not None else 'host RAM'}",
                 ""))
    rows.append(("  weights", _size(en["weights"])))
    if en.get("awake") is not None:
        rows.append(("  gpu_memory_utilization share", _size(en["budget"])))
        rows.append(("  KV cache", _size(en["kv_cache"])))
    elif en.get("budget") is not None:
        rows.append(("  reserve (gpu_memory_utilization x host RAM)", _size(en["budget"])))
        rows.append(("  KV cache", _size(en["kv_cache"])))
    else:
        rows.append(("  KV cache", "gpu_memory_utilization x host RAM (give --host-memory-gib)"))
    if en.get("kv_tokens") is not None:
        held = f"{_tokens(en['kv_tokens'])} / {_tokens(en['concurrent_need_tokens'])}"
        rows.append(("  KV tokens held / a round's need", held))
    if gpu:
        ph = mem.get("colocated_phases")
        if ph:
            rows.append(("colocated GPU while training (engine asleep)", _size(ph["training"])))
            rows.append(("colocated GPU while generating", _size(ph["generating"])))
        for where, peak in mem["per_gpu_peak"].items():
            rows.append((f"PEAK, {where}", f"{_size(peak)} of {mem['gpu_memory_gib']:g} GiB"))
    else:
        rows.append(("host RAM per learner rank", _size(mem["host"]["per_learner_rank"])))
    width = max(len(a) for a, _ in rows) + 2
    out = ["memory estimate (formulas: rl/plan.py, docs/cluster.md)"]
    out += [f"  {a.ljust(width)}{b}".rstrip() for a, b in rows]
    return out


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
