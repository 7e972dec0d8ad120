"""LoRA building blocks: a policy with low-rank adapters on its linear layers (peft), the adapter as the files
vLLM's ``LoRARequest`` loads, and the merged weights (W + scale * B @ A) under the base model's names.

These are the parts LoRA training (``model.lora``, docs/lora.md) is built from (adapter-only sync to the engines,
merged export). vLLM's CPU build serves adapters (its Punica CPU wrapper):
``tests/integration/test_lora_engine.py`` checks that an adapter written here gives the merged model's log-probs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(model, rank: int, alpha: float, dropout: float = 0.0, target_modules=DEFAULT_TARGETS):
    """Wrap ``model`` with LoRA adapters (B initialized to zero, so the output is unchanged); only the adapters
    train. Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     bias="none")
    return get_peft_model(model, cfg)


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (``base_model.model....lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def adapter_files(model, dtype: torch.dtype | None = None) -> dict[str, bytes]:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as bytes: a directory holding them is what
    ``vllm.lora.request.LoRARequest`` (and ``peft.PeftModel.from_pretrained``) loads."""
    from safetensors.torch import save

    config = model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    tensors = {k: (v.to(dtype) if dtype is not None else v).cpu() for k, v in adapter_state_dict(model).items()}
    return {"adapter_config.json": json.dumps(config, default=str).encode(),
            "adapter_model.safetensors": save(tensors)}


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The full weights with every adapter folded in (W + scale * B @ A), under the base model's parameter names,
    without changing ``model``: what an engine that does not serve adapters loads, and the merged export."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    lora_layers = {name: mod for name, mod in base.named_modules() if isinstance(mod, LoraLayer)}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        owner = clean.rsplit(".", 1)[0]
        layer = lora_layers.get(owner)
        if layer is not None and clean.endswith(".weight") and "default" in layer.lora_A:
            delta = layer.get_delta_weight("default")
            tensor = tensor + delta.to(tensor.dtype)
        merged[clean] = tensor.detach().clone()
    return merged


def write_adapter(files: dict[str, bytes], directory) -> None:
    """Write :func:`adapter_files`' output into ``directory`` (created)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
