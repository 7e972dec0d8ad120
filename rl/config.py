"""Typed configuration of a training run.

One pydantic model per section, a description on every field (the single source for defaults and docs),
strict loading: an unknown or misspelled key is an error that names the nearest valid key. Recipes in
``configs/`` set only non-defaults; ``key=value`` overrides use dotted paths (``rollout.temperature=0.7``).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rl.algorithms.config import AlgorithmConfig
from rl.algorithms.gdro import GdroConfig
from rl.config_runtime import AsyncConfig, DrafterSection, PlacementConfig, RayConfig, SyncConfig
from rl.data.datasets import DEFAULT_PROMPT_TEMPLATE
from rl.kind_config import KIND_CONFIGS, KindConfig, SingleTurnKind
from rl.schema import ConfigSection as _Section




class RunConfig(_Section):
    output_dir: str = Field("runs/default", description="Directory for metrics, samples, checkpoints, resolved config.")
    seed: int = Field(0, description="Seed for data order, sampling seeds and model init.")
    num_steps: int = Field(20, ge=1, description="Number of RL steps (one rollout batch + one learner update each).")
    save_every_steps: int = Field(10, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_last_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep on disk.")
    log_samples_per_step: int = Field(4, ge=0, description="Rollout samples written to samples.jsonl per step.")
    tensorboard: bool | None = Field(None, description="Removed: list `tensorboard` in run.trackers instead.")
    progress: bool = Field(True, description="Show a live progress display on the terminal.")
    verbose: bool = Field(
        False,
        description="Show every line of the engines, learners, Ray and DeepSpeed on the console (`rl train "
        "--verbose`). Off: they go to <output_dir>/logs/ and the console shows the run's own lines, warnings and "
        "errors (rl/console.py lists the warnings it hides as harmless, with the reason).",
    )
    trackers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="Where metrics go: `jsonl` (<output_dir>/metrics.jsonl; always on: resume and the plots read "
        "it), `tensorboard` (<output_dir>/tb), `wandb` (project run.project; WANDB_MODE=offline works without a "
        "network), `mlflow` (experiment run.project at run.mlflow_tracking_uri). wandb and MLflow get the run's "
        "name, tags and resolved config, and a resumed run continues the same tracker run.",
    )
    name: str | None = Field(None, description="The run's name in wandb and MLflow (None: output_dir's last part).")
    project: str = Field("rl-reasoning", description="wandb project and MLflow experiment name.")
    tags: list[str] = Field(default_factory=list, description="Tags of the run in wandb and MLflow.")
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db). A "
        "server (http://...), a database (sqlite:///..., postgresql://...) or a Databricks workspace.",
    )

    @model_validator(mode="after")
    def _check_trackers(self) -> "RunConfig":
        if self.tensorboard is not None:
            raise ValueError(f"run.tensorboard={self.tensorboard} was removed: list the trackers in run.trackers, "
                             "e.g. run.trackers=[jsonl,tensorboard,wandb]")
        if "jsonl" not in self.trackers:
            raise ValueError(f"run.trackers={self.trackers} must include jsonl: metrics.jsonl is what --resume, the "
                             "learning curve and `rl` reports read (add wandb, mlflow or tensorboard beside it)")
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"run.trackers={self.trackers} names a tracker twice")
        return self


class TinyModelConfig(_Section):
    task: Literal["arith", "dccot_sum", "number_target"] = Field(
        "arith",
        description="What the embedded tiny model is warm-started on: `arith` (two-number sums, "
        "trainers/tiny_model.py), `dccot_sum` (six-term sums in the DC-CoT director/worker format, "
        "trainers/tiny_dccot.py) or `number_target` (uniformly random valid moves of the `number_target` "
        "environment, for GiGPO; trainers/tiny_number_target.py).",
    )
    seed: int = Field(0, description="Seed of the tiny model's init and supervised warm start.")
    sft_steps: int | None = Field(None, ge=0, description="Supervised warm-start steps (None: the builder's default).")


LORA_ENGINE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM accepts: an engine is started with the smallest one >= ``model.lora.rank``."""
LORA_UNSERVED_MODULES = ("lm_head", "embed_tokens")
"""Target modules whose adapters the engines' LoRA path does not take (vLLM serves adapters on the decoder's
linear layers only)."""


class LoraSection(_Section):
    """LoRA training (docs/lora.md): the base weights are frozen, only the low-rank adapters (peft) train, and each
    sync ships the adapter alone to the engines, which serve it as a new versioned LoRA request."""

    rank: int = Field(..., ge=1, le=512, description="Rank r of every adapter (vLLM serves ranks up to 512).")
    alpha: float = Field(..., gt=0, description="LoRA alpha: the adapter's output is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input in the learner's forward.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Names of the linear layers that get an adapter (peft's target_modules: a module whose name "
        "ends with one of these). Default: every attention and MLP projection of Qwen2 / Llama-style decoders.",
    )

    @model_validator(mode="after")
    def _check_targets(self) -> "LoraSection":
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: name the linear layers that get an adapter, "
                             "e.g. [q_proj, v_proj]")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"model.lora.target_modules={self.target_modules} names a module twice")
        unserved = [m for m in self.target_modules if m in LORA_UNSERVED_MODULES]
        if unserved:
            raise ValueError(f"model.lora.target_modules: {unserved} cannot be served by the engines' LoRA path "
                             "(vLLM takes adapters on the decoder's linear layers only); remove them")
        return self

    def engine_max_rank(self) -> int:
        """The ``max_lora_rank`` the engines start with: the smallest value vLLM accepts that holds ``rank``."""
        return next(r for r in LORA_ENGINE_RANKS if r >= self.rank)


class ModelConfig(_Section):
    path: str | None = Field(
        None,
        description="Checkpoint directory (transformers format). When None and `build_tiny` is true, the embedded "
        "tiny model is built into <output_dir>/tiny_model.",
    )
    build_tiny: bool = Field(False, description="Build the embedded tiny arithmetic model when `path` is None.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="The dtype the policy computes in: the learner's forward and backward (autocast under "
        "learner.strategy=single, FSDP2's mixed-precision parameter dtype, DeepSpeed's bf16/fp16 mode) and, unless "
        "rollout.dtype says otherwise, the engines' weights. The learner's own parameters, gradients and AdamW state "
        "are held in learner.param_dtype (float32 by default: fp32 master weights with bfloat16 compute).",
    )
    lora: LoraSection | None = Field(
        None,
        description="LoRA training (docs/lora.md): {rank, alpha, dropout, target_modules}. None: full fine-tuning. "
        "Set: only the adapters train (the optimizer holds them alone), each sync sends the adapter alone to the "
        "engines (through the object store, in one piece: sync.transport and sync.bucket_mb do not apply) and the "
        "canary runs through it, checkpoints hold the adapter (and the merged model). Every learner.strategy.",
    )

    @model_validator(mode="after")
    def _need_a_model(self) -> "ModelConfig":
        if self.path is None and not self.build_tiny:
            raise ValueError("model.path is not set: give a checkpoint directory (model.path=/path/to/model) "
                             "or set model.build_tiny=true for the embedded tiny model")
        return self


class DatasetConfig(_Section):
    kind: Literal["arith", "dccot_sum", "jsonl"] = Field(
        "arith",
        description="`arith`: the embedded synthetic task; `dccot_sum`: its DC-CoT variant (six-term sums, prompt "
        "ending in `<think>`); `jsonl`: a file.",
    )
    path: str | None = Field(None, description="For kind=jsonl: a JSONL path, or a benchmark name resolved in data_dir.")
    split: Literal["train", "test"] = Field("train", description="For kind=arith: which split to generate.")
    num_problems: int | None = Field(None, ge=1, description="Use at most this many problems (None: all; arith needs it).")
    seed: int = Field(0, description="Seed of the synthetic task generator (kind=arith).")
    problem_field: str = Field("problem", description="Field holding the question text (kind=jsonl).")
    answer_field: str = Field("answer", description="Field holding the gold answer (kind=jsonl).")
    id_field: str = Field("id", description="Field holding the row id (kind=jsonl); the line number when absent.")
    prompt_template: str | None = Field(
        None,
        description="Template applied to the question (kind=jsonl); `{problem}` is replaced. None: "
        "rl.data.datasets.DEFAULT_PROMPT_TEMPLATE (`{problem}` then 'Please reason step by step, and put your final "
        "answer within \\boxed{}.'). The embedded tasks (arith, dccot_sum) have their own prompts.",
    )
    use_chat_template: bool = Field(False, description="Wrap the prompt with the tokenizer's chat template (kind=jsonl).")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A malformed row: `error` stops with the row number; `skip` counts and skips it."
    )

    @model_validator(mode="after")
    def _jsonl_only_keys(self) -> "DatasetConfig":
        if self.kind != "jsonl":
            used = [k for k in ("path", "prompt_template") if getattr(self, k) is not None]
            used += ["use_chat_template"] if self.use_chat_template else []
            if used:
                raise ValueError(f"{', '.join(used)} only apply to kind=jsonl; kind={self.kind} builds its own "
                                 "prompts (remove them, or set kind: jsonl)")
        return self


class DataConfig(_Section):
    data_dir: str | None = Field(
        None, description="Directory of benchmark JSONL files (default: env RL_DATA_DIR, else ../shared/data)."
    )
    train: DatasetConfig = Field(default_factory=lambda: DatasetConfig(kind="arith", split="train", num_problems=20000))
    eval: DatasetConfig = Field(default_factory=lambda: DatasetConfig(kind="arith", split="test", num_problems=200))


class DynamicSamplingConfig(_Section):
    """DAPO dynamic sampling: drop groups whose filter metric is constant, generate again until the batch is full."""

    enabled: bool = Field(False, description="Filter constant groups and refill the batch (DAPO). Off: one round.")
    metric: Literal["accuracy", "score", "correct_and_format"] = Field(
        "accuracy",
        description="What must vary within a kept group: `accuracy` (the verifier verdict; DAPO's `acc`, the "
        "recommended choice) or `score` (the shaped reward, so length penalties alone can keep a group). "
        "`correct_and_format` (DC-CoT only) instead keeps a group iff at least one response is correct AND "
        "format-valid, so all-correct groups stay (DC-CoT stages 1-2: their advantages then rank path lengths).",
    )
    prompts_per_round: int | None = Field(
        None, ge=1, description="Prompts generated per round (None: rollout.prompts_per_step; DAPO used 3x).",
    )
    max_rounds: int = Field(
        10, ge=1,
        description="Generation rounds per step at most (verl max_num_gen_batches=10). When the cap is hit the step "
        "trains on the groups it has (metric `dapo/batch_fill_frac` < 1) instead of looping forever.",
    )


class RolloutConfig(_Section):
    num_engines: int = Field(1, ge=1, description="vLLM engine actors (data parallel).")
    num_cpus_per_engine: float = Field(1.0, ge=0, description="Ray CPUs reserved per engine actor.")
    num_gpus_per_engine: float = Field(0.0, ge=0, description="Ray GPUs per engine actor (0 on CPU).")
    prompts_per_step: int = Field(16, ge=1, description="Prompts sampled per RL step.")
    num_samples_per_prompt: int = Field(8, ge=1, description="Responses per prompt (the GRPO group size).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the learner uses the same one).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; keep 1.0 for exact importance ratios.")
    max_response_tokens: int = Field(64, ge=1, description="Max new tokens per response.")
    max_model_len: int = Field(512, ge=16, description="Engine context length (prompt + response).")
    gpu_memory_utilization: float = Field(
        0.15, gt=0, le=1, description="vLLM memory share (on CPU: share of RAM for the KV cache)."
    )
    enforce_eager: bool | None = Field(
        None,
        description="Disable torch.compile and graphs in the engines (faster start, slower generation). None: eager "
        "on CPU, where compiling costs more start-up than it saves, compiled on GPUs.",
    )
    engine_core: Literal["auto", "in_process", "process"] = Field(
        "auto",
        description="Where each engine's vLLM core runs (VLLM_ENABLE_V1_MULTIPROCESSING): in the engine actor's own "
        "process or in a process of its own. auto: in-process on CPU (start-up in seconds), its own process on GPUs.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="Tensor parallel degree of each engine.")
    model_runner: Literal["auto", "v1", "v2"] = Field(
        "auto",
        description="vLLM's model runner in the engines (VLLM_USE_V2_MODEL_RUNNER): auto lets vLLM choose (V2 on CUDA "
        "with Triton, V1 on the CPU build); v1 / v2 pin it. The runner chosen is logged at start-up.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="The engines' weights dtype (None: model.dtype). The learner casts its weights to it on its "
        "device before each sync (fp32 master weights are sent as bfloat16 to bfloat16 engines), and the drafter's "
        "weights follow it too.",
    )
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)


class KernelsConfig(_Section):
    """Learner kernels (docs/architecture.md, "Learner kernels"); the choice is logged at learner start-up."""

    logprob: Literal["auto", "naive", "chunked", "triton"] = Field(
        "auto",
        description="Token log-probs/entropy: `naive` materializes the [tokens, vocab] logits with the model's own "
        "head; `chunked` (torch, any device) and `triton` (CUDA) compute them from hidden states and the LM-head "
        "weight without it. `auto`: triton on CUDA (chunked without triton); on CPU chunked when a micro-batch's "
        "fp32 logits would exceed 256 MiB, else naive. Heads with a bias or logit soft-capping always use naive.",
    )
    attention: Literal["auto", "padded", "packed"] = Field(
        "auto",
        description="Micro-batch layout: `padded` rows, or `packed` (padding-free: sequences back to back, varlen "
        "attention with flash-attn, else torch varlen_attn on CUDA, else per-sequence SDPA). `auto`: packed on "
        "CUDA, padded on CPU. Sliding-window or non-attention layers fall back to padded.",
    )
    logprob_chunk_size: int | None = Field(
        None, ge=1, description="Rows per chunk of the `chunked` kernel (None: about 128 MiB of fp32 logits per chunk).",
    )


class FsdpConfig(_Section):
    """FSDP2 settings (learner.strategy=fsdp2)."""

    param_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Removed (setting it is an error that says what to set instead): FSDP2 computes in model.dtype "
        "(its MixedPrecisionPolicy parameter dtype) and keeps its shards, gradients and AdamW state in "
        "learner.param_dtype.",
    )
    reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the gradient reduce-scatter (float32 keeps the sum exact enough).",
    )
    reshard_after_forward: bool = Field(
        True, description="Free gathered parameters after each layer's forward (ZeRO-3 style; False: ZeRO-2 style).",
    )
    cpu_offload: bool = Field(
        False, description="Keep sharded parameters, gradients and optimizer state in host memory (GPU runs).",
    )

    @model_validator(mode="after")
    def _removed_param_dtype(self) -> "FsdpConfig":
        if self.param_dtype is not None:
            raise ValueError(
                f"learner.fsdp.param_dtype={self.param_dtype} was removed: set model.dtype={self.param_dtype} (the "
                "dtype FSDP2 computes in) and learner.param_dtype (the dtype of the sharded master weights, gradients "
                "and AdamW state; float32 by default)")
        return self


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO-3 settings (learner.strategy=deepspeed); the DeepSpeed config is generated from these and
    the learner section (optimizer, clipping, precision)."""

    offload_optimizer: bool = Field(
        False, description="Keep the optimizer state (and its step) in host memory (GPU runs; ignored on a CPU learner).",
    )
    offload_params: bool = Field(
        False, description="Keep the partitioned parameters in host memory (GPU runs; ignored on a CPU learner).",
    )
    reduce_bucket_size: int = Field(50_000_000, ge=1, description="Elements per gradient reduce-scatter bucket.")
    prefetch_bucket_size: int = Field(50_000_000, ge=1, description="Elements of parameters prefetched ahead of use.")
    param_persistence_threshold: int = Field(
        100_000, ge=0, description="Parameters smaller than this many elements stay whole on every rank.",
    )


class LearnerConfig(_Section):
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    param_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="The dtype of the learner's own parameters (the master weights), their gradients and AdamW "
        "state; the forward and backward run in model.dtype. float32 (default) with model.dtype=bfloat16 is mixed "
        "precision: fp32 masters, bf16 compute, weights cast to rollout.dtype for the engines. Equal to a 16-bit "
        "model.dtype it is pure low precision: half the state memory, but AdamW then steps bf16 weights and rounds "
        "away most updates at small learning rates (rl plan warns). DeepSpeed keeps fp32 master partitions in its "
        "bf16/fp16 mode either way. A 16-bit param_dtype needs the same model.dtype (the learner refuses others).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    micro_batch_tokens: int = Field(
        4096, ge=16, description="Token budget of one micro-batch (padded tokens count; packed: real tokens).",
    )
    mini_batches_per_step: int = Field(1, ge=1, description="Optimizer steps per RL step (PPO mini-batches).")
    epochs_per_step: int = Field(1, ge=1, description="Passes over the rollout batch per RL step.")
    old_logprob_source: Literal["learner", "engine"] = Field(
        "learner",
        description="Where pi_old comes from: `learner` recomputes log-probs before the update (exact); `engine` uses "
        "the vLLM behaviour log-probs (saves a forward pass; exact only when engine and learner agree).",
    )
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved for each learner rank.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs for each learner rank (0 on CPU, 1 on a GPU cluster).")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads in the learner (None: default).")
    kernels: KernelsConfig = Field(
        default_factory=KernelsConfig, description="Log-prob kernel and micro-batch layout (learner.kernels.*).",
    )
    strategy: Literal["single", "fsdp2", "deepspeed"] = Field(
        "single",
        description="How the policy is held: `single` (one unsharded copy, one rank), `fsdp2` (torch FSDP2 "
        "`fully_shard` over `num_ranks` ranks: each decoder layer and the rest of the model sharded; gloo on CPU, "
        "NCCL on GPU) or `deepspeed` (DeepSpeed ZeRO-3 over `num_ranks` ranks, config generated from this section "
        "and `learner.deepspeed`; gloo on CPU, NCCL on GPU).",
    )
    init_timeout_s: float = Field(
        300.0, gt=0,
        description="Seconds the learner ranks' process group may take to form (the rendezvous at rank 0, and NCCL's "
        "communicator, created at start-up): past it the run stops naming the address instead of waiting.",
    )
    num_ranks: int = Field(
        1, ge=1, description="Learner ranks (Ray actors forming one torch process group); each gets num_gpus GPUs.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in backward (transformers gradient checkpointing).",
    )
    fsdp: FsdpConfig = Field(default_factory=lambda: FsdpConfig(), description="FSDP2 settings (strategy=fsdp2).")
    deepspeed: DeepSpeedConfig = Field(
        default_factory=lambda: DeepSpeedConfig(), description="DeepSpeed ZeRO-3 settings (strategy=deepspeed).",
    )


class RewardEntry(_Section):
    name: str = Field(..., description="Registered name, `package.module:function` or `path/to/file.py:function`.")
    weight: float = Field(1.0, description="Weight in the combined reward.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the reward.")


class RewardPoolConfig(_Section):
    num_workers: int = Field(2, ge=1, description="Grader worker processes.")
    timeout_s: float = Field(5.0, gt=0, description="Wall-clock limit per grading call, enforced from outside.")
    audit_fraction: float = Field(0.0, ge=0, le=1, description="Share of `incorrect` verdicts re-checked by a second method.")
    max_error_rate: float = Field(
        1.0, gt=0, le=1,
        description="Stop the run when one reward returns status `error` (it raised, crashed or returned no number) on "
        "at least this share of a training step's graded responses, after saving a checkpoint of the last completed "
        "step; 1.0: only when it errored on every one. Lower error rates are warned about on the console and counted "
        "(reward/<name>/error_rate, num_errors).",
    )


class EvalConfig(_Section):
    every_steps: int = Field(0, ge=0, description="Evaluate on data.eval every N steps (0: only before and after).")
    num_samples: int = Field(1, ge=1, description="Samples per eval problem.")
    temperature: float = Field(0.0, ge=0, description="Eval sampling temperature (0: greedy).")
    max_response_tokens: int | None = Field(None, ge=1, description="Eval max tokens (None: rollout's).")
    benchmarks: list[str] = Field(
        default_factory=list,
        description="Also evaluate these benchmarks (names in data.data_dir such as math500, gsm8k, aime24, or "
        "JSONL/Parquet paths) with the statistics of `rl eval`: `eval/<bench>/pass@k`, `maj@k`, `mean@n` with "
        "bootstrap CIs, every `every_steps` and at the start and end, with `num_samples` samples per problem.",
    )
    benchmark_limit: int | None = Field(None, ge=1, description="First N problems of each benchmark (None: all).")
    benchmark_template: str = Field(
        DEFAULT_PROMPT_TEMPLATE,
        description="Prompt template of the benchmark problems (`{problem}` is replaced); the model's chat "
        "template wraps it when the tokenizer has one.",
    )


class ShapingConfig(_Section):
    """Reward and loss-mask shaping applied to graded responses before advantages (DAPO's overlong handling)."""

    overlong_buffer_len: int = Field(
        0, ge=0,
        description="Soft overlong punishment: responses longer than max_response_tokens - overlong_buffer_len get "
        "a linear penalty reaching -overlong_penalty_factor at max_response_tokens (DAPO: 4096 of 20480). 0: off.",
    )
    overlong_penalty_factor: float = Field(1.0, ge=0, description="Penalty at the length limit (DAPO: 1.0).")
    mask_truncated: bool = Field(
        False, description="Overlong filtering: responses cut at max_response_tokens get no loss (DAPO ablation)."
    )


class Config(_Section):
    """A whole training run."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(build_tiny=True))
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rewards: list[RewardEntry] = Field(default_factory=lambda: [RewardEntry(name="math_verify")])
    reward_pool: RewardPoolConfig = Field(default_factory=RewardPoolConfig)
    shaping: ShapingConfig = Field(default_factory=ShapingConfig)
    gdro: GdroConfig = Field(default_factory=GdroConfig)
    kind: KindConfig = Field(
        default_factory=SingleTurnKind,
        description="The rollout kind and its settings, chosen by `kind.name`: `single_turn` (prompts from data.train, "
        "the default), `episodes` (multi-turn environment episodes with GiGPO), `dccot` (DC-CoT director/worker "
        "trajectories, docs/dccot.md) or `plugin` (a class of yours in a file, docs/rollout_kinds.md).",
    )
    sync: SyncConfig = Field(default_factory=SyncConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    async_mode: AsyncConfig = Field(default_factory=AsyncConfig)
    drafter: DrafterSection = Field(default_factory=DrafterSection)

    @model_validator(mode="after")
    def _check_batch(self) -> "Config":
        total = self.rollout.prompts_per_step * self.rollout.num_samples_per_prompt
        if total % self.learner.mini_batches_per_step:
            raise ValueError(
                f"rollout.prompts_per_step * rollout.num_samples_per_prompt = {total} samples per step is not divisible "
                f"by learner.mini_batches_per_step = {self.learner.mini_batches_per_step}"
            )
        if self.rollout.prompts_per_step % self.learner.mini_batches_per_step:
            raise ValueError(
                f"rollout.prompts_per_step={self.rollout.prompts_per_step} must be divisible by "
                f"learner.mini_batches_per_step={self.learner.mini_batches_per_step} (mini-batches hold whole groups)"
            )
        if self.rollout.max_response_tokens >= self.rollout.max_model_len:
            raise ValueError("rollout.max_response_tokens must be smaller than rollout.max_model_len")
        if self.shaping.overlong_buffer_len > self.rollout.max_response_tokens:
            raise ValueError(
                f"shaping.overlong_buffer_len={self.shaping.overlong_buffer_len} exceeds rollout.max_response_tokens="
                f"{self.rollout.max_response_tokens}; it must be at most that (DAPO: 4096 of 20480)"
            )
        if self.gdro.rollout_gdro and self.gdro.n_mean != self.rollout.num_samples_per_prompt:
            raise ValueError(
                f"gdro.n_mean={self.gdro.n_mean} must equal rollout.num_samples_per_prompt="
                f"{self.rollout.num_samples_per_prompt}: Rollout-GDRO redistributes that mean budget over bins"
            )
        self.kind.check(self)
        if not self.rewards:
            raise ValueError("rewards is empty: configure at least one reward, e.g. [{name: math_verify}]")
        self._check_distributed()
        if self.model.lora is not None:
            self._check_lora()
        self._check_transport()
        if self.drafter.mode != "off" and self.drafter.train and self.learner.old_logprob_source != "learner":
            raise ValueError("drafter.train learns from the learner's old-log-prob pass over the rollouts: set "
                             "learner.old_logprob_source=learner (or drafter.train=false)")
        return self

    def weight_transport(self) -> str:
        """``sync.transport`` resolved for this run's placement (``object_store``, ``gloo``, ``nccl`` or ``ipc``;
        ``adapter`` with ``model.lora``: the adapter alone, through the object store)."""
        if self.model.lora is not None:
            return "adapter"
        return self.sync.resolved_transport(engines_on_gpu=self.rollout.num_gpus_per_engine > 0,
                                            learner_on_gpu=self.learner.num_gpus > 0,
                                            colocated=self.placement.mode == "colocated",
                                            learner_ranks=self.learner.num_ranks)

    def _check_transport(self) -> None:
        t, pc, lc = self.sync.transport, self.placement, self.learner
        if t == "nccl":
            if self.rollout.num_gpus_per_engine <= 0 or lc.num_gpus <= 0:
                raise ValueError("sync.transport=nccl needs the learner and the engines on GPUs (learner.num_gpus and "
                                 "rollout.num_gpus_per_engine > 0); on CPU use gloo")
            if pc.mode == "colocated":
                raise ValueError("sync.transport=nccl cannot join two processes on one GPU (placement.mode=colocated "
                                 "puts learner rank 0 and engine 0 on one): use ipc (one learner rank) or object_store")
        if t == "ipc" and (pc.mode != "colocated" or lc.num_ranks != 1):
            raise ValueError(f"sync.transport=ipc shares the learner's memory with the engines on its node: it needs "
                             f"placement.mode=colocated and learner.num_ranks=1 (got {pc.mode}, {lc.num_ranks}); use "
                             "gloo (CPU), nccl (GPUs, disaggregated) or object_store")

    def _check_lora(self) -> None:
        """What ``model.lora`` is not wired with is refused here, naming the key."""
        if self.sync.transport != "auto":
            raise ValueError(f"sync.transport={self.sync.transport} with model.lora: the engines receive the adapter "
                             "alone, through the object store (a few MiB); leave sync.transport=auto")
        if self.drafter.mode != "off":
            raise ValueError(f"drafter.mode={self.drafter.mode} with model.lora: the online drafter is not wired "
                             "with LoRA engines; set drafter.mode=off")
        if self.placement.mode == "colocated" and self.placement.engine_sleep_level == 2:
            raise ValueError("placement.engine_sleep_level=2 with model.lora: level 2 drops the engines' base weights "
                             "and a LoRA sync sends the adapter alone, so they would never come back; set "
                             "placement.engine_sleep_level=1 (offload and restore) or 0")

    def canary_dtype(self) -> str:
        """The least precise of the dtypes the canary's two sides compute in: the learner's ``model.dtype`` and the
        engines' ``rollout.dtype`` (None: the same)."""
        order = ("float32", "float16", "bfloat16")
        return max(self.model.dtype, self.rollout.dtype or self.model.dtype, key=order.index)

    def _check_distributed(self) -> None:
        lc, pc = self.learner, self.placement
        if lc.strategy == "single" and lc.num_ranks > 1:
            raise ValueError(f"learner.num_ranks={lc.num_ranks} needs a sharded strategy: set learner.strategy=fsdp2 or deepspeed "
                             "(learner.strategy=single holds one unsharded copy on one rank)")
        if pc.mode == "colocated":
            if self.rollout.num_engines != lc.num_ranks:
                raise ValueError(
                    f"placement.mode=colocated pairs engine i with learner rank i: rollout.num_engines="
                    f"{self.rollout.num_engines} must equal learner.num_ranks={lc.num_ranks}")
            if self.rollout.num_gpus_per_engine > 1 or lc.num_gpus > 1:
                raise ValueError("placement.mode=colocated shares one GPU per bundle: rollout.num_gpus_per_engine and "
                                 "learner.num_gpus must be at most 1 (use disaggregated for tensor-parallel engines)")
        if self.async_mode.enabled and pc.mode == "colocated":
            # Engines sleep while the learner trains on the same devices: there is no generation to overlap.
            raise ValueError("async_mode.enabled needs placement.mode=disaggregated: with placement.mode=colocated the "
                             "engines and the learner share the devices, so the next batch cannot be generated while "
                             "the learner trains; set placement.mode=disaggregated or async_mode.enabled=false")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says how to fix it."""


def _check_keys(model: type[BaseModel], data: Any, prefix: str) -> None:
    """Walk raw data against the schema; an unknown key fails with the nearest valid key."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} (valid keys here: {', '.join(fields)})")
        ann = fields[key].annotation
        sub = _kind_type(value, f"{prefix}{key}") if key == "kind" and model is Config else _section_type(ann)
        if sub is not None:
            if isinstance(value, list):
                for i, item in enumerate(value):
                    _check_keys(sub, item, f"{prefix}{key}[{i}].")
            else:
                _check_keys(sub, value, f"{prefix}{key}.")


def _kind_type(value: Any, where: str) -> type[BaseModel] | None:
    """The ``kind`` section's class, by its ``name`` (the discriminated union's tag)."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if name not in KIND_CONFIGS:
        raise ConfigError(f"{where}.name={name!r}: choose one of {', '.join(KIND_CONFIGS)} (docs/rollout_kinds.md)")
    return KIND_CONFIGS[name]


def _section_type(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[1,2]"]`` -> ``[("a.b", 1), ("c", [1, 2])]``; values are parsed as YAML."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. rollout.temperature=0.7)")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return parsed


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML recipe (or the defaults when ``path`` is None), apply overrides, validate strictly."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, model:, ...)")
        data = loaded
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    for old, name in (("multiturn", "episodes"), ("dccot", "dccot")):
        if old in data:
            raise ConfigError(f"'{old}' is now the kind section: write `kind: {{name: {name}, ...}}` with the same "
                              f"keys (overrides: kind.<key>=...; docs/rollout_kinds.md)")
    _check_keys(Config, data, "")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n" + "\n".join(lines)) from None


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Keys a resumed run may change (`rl train --resume`): where the run directory is, how long the run goes, what it
# writes and how often, how often it evaluates, where its processes run. Any other change would continue the
# checkpoint under another recipe: it is shown and refused unless `--allow-config-change`. A key ending in "." is
# a whole section.
RESUME_SAFE_KEYS = ("run.output_dir", "run.num_steps", "run.save_every_steps", "run.keep_last_checkpoints",
                    "run.log_samples_per_step", "run.tensorboard", "run.progress", "eval.every_steps",
                    "reward_pool.num_workers", "ray.", "rollout.num_engines", "rollout.enforce_eager",
                    "rollout.engine_core")
"""Every request carries its own seed, so the engine count does not change what is sampled (1 and 2 engines give
identical runs on CPU: tests/e2e/test_train_tiny.py resumes with a second engine): a run that lost a node
resumes on fewer engines. How an engine runs (compiled or eager, its core in which process) moves only the
engines' log-prob rounding (benchmarks/engine_start.py: the same tokens in every mode); runs started before the
CPU default became eager (``rollout.enforce_eager: false`` in their config.yaml) resume without a flag."""


def config_changes(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None,
                   prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` of every value that differs between two resolved configs (mappings
    as ``dump_config`` writes them), in key order; a list is one value. A key on one side only has ``"<absent>"``
    on the other, except that a key the old config lacks (written before the key existed) is no change when the
    new value is its default in ``defaults`` (a resolved default config)."""
    defaults = defaults or {}
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            out += config_changes(a, b, sub if isinstance(sub, dict) else {}, f"{prefix}{key}.")
        elif a != b and not (key not in old and key in defaults and b == defaults[key]):
            out.append((f"{prefix}{key}", a, b))
    return out


def resume_safe(key: str) -> bool:
    """Whether a resumed run may change ``key`` (``RESUME_SAFE_KEYS``)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE_KEYS)


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """One ``  key: old -> new`` line per change; keys a resume may not change are marked."""
    return "\n".join(f"  {key}: {json.dumps(a)} -> {json.dumps(b)}{'' if resume_safe(key) else '  (not resumable)'}"
                     for key, a, b in changes)
