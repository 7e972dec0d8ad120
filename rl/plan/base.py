"""The plan's units and model: byte sizes, model shapes (known table, HF config, a spec string), the dtypes
of masters and engines, findings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1 << 30
MIB = 1 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_BYTES = GIB // 2
ENGINE_OVERHEAD_BYTES = 2 * GIB
FUSED_BUFFER_BYTES = 256 * MIB
DRAFTER_CHUNK_BYTES = 128 * MIB  # rollout.drafter.train.DrafterLossConfig.chunk_bytes
AUTO_CPU_LOGITS_BYTES = 256 * MIB  # trainers.logprob: CPU `auto` switches to chunked above this


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

    LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def lora_params(self, rank: int, target_modules) -> int:
        """Parameters of rank-``rank`` adapters on ``target_modules`` of every layer: r * (in + out) each."""
        h, q, k, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        dims = {"q_proj": h + q, "k_proj": h + k, "v_proj": h + k, "o_proj": q + h, "gate_proj": h + i,
                "up_proj": h + i, "down_proj": i + h}
        unknown = [m for m in target_modules if m not in dims]
        if unknown:
            raise ValueError(f"model.lora.target_modules {unknown}: not a linear layer of this shape's decoder "
                             f"(rl plan knows {list(dims)})")
        return self.layers * sum(rank * dims[m] for m in target_modules)

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
# size (arith 320, dccot_sum 360, number_target 320; it has 287), so these are upper bounds.
TINY_SHAPES = {
    "arith": ModelShape("tiny (arith)", 128, 4, 2, 2, 512, 320, True, head_dim=64),
    "dccot_sum": ModelShape("tiny (dccot_sum)", 128, 4, 2, 2, 512, 360, True, head_dim=64),
    "number_target": ModelShape("tiny (number_target)", 128, 4, 2, 2, 512, 320, True, head_dim=64),
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


def engine_dtype(cfg) -> str:
    """The engines' weights dtype: rollout.dtype, else model.dtype."""
    return cfg.rollout.dtype or cfg.model.dtype


def master_dtype(cfg) -> str:
    """The dtype the learner's optimizer steps: DeepSpeed keeps fp32 masters of a 16-bit module itself."""
    return "float32" if cfg.learner.strategy == "deepspeed" else cfg.learner.param_dtype
