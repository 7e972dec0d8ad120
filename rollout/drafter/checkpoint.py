"""The drafter checkpoint in the format vLLM's ``eagle`` speculative method loads, and bytes for in-place reloads.

A checkpoint directory holds two files:

- ``config.json``: a Llama config (``"architectures": ["LlamaForCausalLM"]``, ``"model_type": "llama"``) with the
  drafter's shape. vLLM wraps it in its EAGLE config and maps ``LlamaForCausalLM`` to ``EagleLlamaForCausalLM``;
  there is no Qwen2 EAGLE class, and a Qwen2 target works with this Llama-shaped drafter.
- ``model.safetensors``: ``fc.weight [H, 2H]`` and ``layers.{i}.*`` (q/k/v/o, gate/up/down projections and the
  norms), with no ``model.`` prefix. Without ``embed_tokens`` and ``lm_head`` vLLM shares the target's.

Use: ``LLM(model=target, speculative_config={"method": "eagle", "model": checkpoint_dir,
"num_speculative_tokens": K})``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from rollout.drafter.model import Drafter, DrafterConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config_dict(cfg: DrafterConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config.json`` contents: what vLLM's Llama layers read, in transformers' Llama field names."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported checkpoint dtype {dtype}: valid are {sorted(_DTYPE_NAMES.values())}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        # transformers 5 reads rope_parameters; the flat key is for older readers.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "dtype": _DTYPE_NAMES[dtype],
    }


def config_from_dict(d: dict[str, Any]) -> DrafterConfig:
    """Inverse of ``hf_config_dict``."""
    arch = d.get("architectures")
    if arch != ["LlamaForCausalLM"]:
        raise ValueError(f"not a drafter checkpoint: architectures {arch}, expected ['LlamaForCausalLM']")
    rope = d.get("rope_parameters") or {}
    return DrafterConfig(
        hidden_size=d["hidden_size"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"],
        head_dim=d["head_dim"],
        intermediate_size=d["intermediate_size"],
        vocab_size=d["vocab_size"],
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta"))),
        rms_norm_eps=d["rms_norm_eps"],
        max_position_embeddings=d["max_position_embeddings"],
        num_layers=d["num_hidden_layers"],
    )


def expected_weight_shapes(cfg: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a checkpoint of ``cfg`` holds (and nothing else)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"fc.weight": (h, 2 * h)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        if i > 0:
            shapes[p + "input_layernorm.weight"] = (h,)
        shapes.update({
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
    return shapes


def _export_tensors(drafter: Drafter, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    # Own contiguous copies: safetensors refuses shared or strided storage.
    state = drafter.trainable_state_dict()
    expected = expected_weight_shapes(drafter.cfg)
    assert {n: tuple(t.shape) for n, t in state.items()} == expected, "drafter weights do not match the format"
    return {n: t.detach().to(dtype or t.dtype).contiguous().clone().cpu() for n, t in state.items()}


def weights_for_transfer(drafter: Drafter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The drafter's own weights by checkpoint name, as CPU tensors in ``dtype`` (``weights_for_reload``'s content,
    for a transport that sends tensors rather than bytes)."""
    return _export_tensors(drafter, dtype)


def weights_for_reload(drafter: Drafter, dtype: torch.dtype | None = None) -> bytes:
    """The drafter's own weights as safetensors bytes (checkpoint names): ``Engine.load_drafter_weights``'s input.

    ``dtype``: the engine's dtype when it differs from the drafter's (the engine casts on load in any case)."""
    from safetensors.torch import save

    return save(_export_tensors(drafter, dtype))


def save_drafter(drafter: Drafter, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``out_dir`` (replacing it) so that it is never seen half-written.

    The files go to a temporary sibling directory which is then renamed to ``out_dir``; an existing ``out_dir``
    is first renamed aside and deleted after the swap (between the two renames ``out_dir`` is briefly absent).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_export_tensors(drafter, dtype), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_dict(drafter.cfg, dtype), indent=2) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def read_drafter_config(path: str | os.PathLike) -> DrafterConfig:
    return config_from_dict(json.loads((Path(path) / CONFIG_FILE).read_text()))


def load_drafter(path: str | os.PathLike, target_model: torch.nn.Module | None = None) -> Drafter:
    """A ``Drafter`` from ``save_drafter``'s directory (float32), with the shared weights copied from
    ``target_model`` (a transformers causal LM). Without it the embedding and LM head stay randomly initialized:
    call ``drafter.copy_shared_from(target)`` before use."""
    from safetensors.torch import load_file

    cfg = read_drafter_config(path)
    drafter = Drafter(cfg)
    tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    expected = expected_weight_shapes(cfg)
    got = {n: tuple(t.shape) for n, t in tensors.items()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ValueError(f"{path}: tensors do not match the drafter format (missing {missing}, unexpected {extra}, "
                         f"or wrong shapes)")
    result = drafter.load_state_dict({n: t.float() for n, t in tensors.items()}, strict=False)
    assert not result.unexpected_keys and all(k.startswith(Drafter.SHARED_PREFIXES) for k in result.missing_keys)
    if target_model is not None:
        drafter.copy_shared_from(target_model)
    return drafter
