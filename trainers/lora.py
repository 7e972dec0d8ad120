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


PEFT_PREFIX = "base_model.model."
"""What a peft model's state-dict names add in front of the base model's (``PeftModel.base_model.model``)."""


def is_adapter_key(key: str) -> bool:
    """Whether a base-model state-dict entry is an adapter tensor (``...q_proj.lora_A.default.weight``)."""
    return ".lora_A." in key or ".lora_B." in key


def saved_name(key: str, adapter: str = "default") -> str:
    """The name peft saves an adapter tensor under (``adapter_model.safetensors``; what vLLM's ``LoRARequest``
    reads), from its name in the base model's state dict: ``model.layers.0.self_attn.q_proj.lora_A.default.weight``
    -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    head, sep, tail = key.rpartition(f".{adapter}.")
    if not sep or not is_adapter_key(key):
        raise ValueError(f"{key!r} is not a tensor of adapter {adapter!r}")
    return f"{PEFT_PREFIX}{head}.{tail}"


def adapter_state_dict(model, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (:func:`saved_name`). ``tensors``: the adapter's whole
    tensors under the base model's state-dict names (a sharded learner gathers them first); None: read them from
    ``model`` (unsharded)."""
    if tensors is None:
        tensors = {k: v.detach() for k, v in model.get_base_model().state_dict().items() if is_adapter_key(k)}
    return {saved_name(k): v.contiguous() for k, v in tensors.items()}


def adapter_keys(model) -> dict[str, str]:
    """peft's saved name -> the base model's state-dict name, for every adapter tensor of ``model`` (read from the
    names alone: works on a sharded model)."""
    return {saved_name(k): k for k in model.get_base_model().state_dict(keep_vars=True) if is_adapter_key(k)}


def adapter_files(model, dtype: torch.dtype | None = None,
                  tensors: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as bytes: a directory holding them is what
    ``vllm.lora.request.LoRARequest`` (and ``peft.PeftModel.from_pretrained``) loads. ``tensors`` as for
    :func:`adapter_state_dict`."""
    from safetensors.torch import save

    config = model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    out = {k: (v.to(dtype) if dtype is not None else v).cpu() for k, v in adapter_state_dict(model, tensors).items()}
    return {"adapter_config.json": json.dumps(config, default=str).encode(),
            "adapter_model.safetensors": save(out)}


def merged_state_dict(model, whole: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The full weights with every adapter folded in (W + scale * B @ A, in fp32, then W's dtype), under the base
    model's parameter names, without changing ``model``: what an engine that does not serve adapters loads, and
    the merged export. ``whole``: every entry of the base model's state dict as a whole tensor, the caller's own
    copies (a learner gathers them first): the entries without an adapter are returned as they are, not copied;
    None: read from ``model`` (unsharded), copying every entry."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    owned = whole is not None
    whole = base.state_dict() if whole is None else whole
    merged: dict[str, torch.Tensor] = {}
    lora_layers = {name: mod for name, mod in base.named_modules() if isinstance(mod, LoraLayer)}
    for name, tensor in whole.items():
        if is_adapter_key(name):
            continue
        clean = name.replace(".base_layer.", ".")
        owner = clean.rsplit(".", 1)[0]
        layer = lora_layers.get(owner)
        if layer is not None and clean.endswith(".weight") and "default" in layer.lora_A:
            a = whole[f"{owner}.lora_A.default.weight"].float()
            b = whole[f"{owner}.lora_B.default.weight"].float()
            delta = (b @ a) * layer.scaling["default"]
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            tensor = (tensor.float() + delta).to(tensor.dtype)
        elif not owned:
            tensor = tensor.detach().clone()
        merged[clean] = tensor
    return merged


def write_adapter(files: dict[str, bytes], directory) -> None:
    """Write :func:`adapter_files`' output into ``directory`` (created)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
