"""The learner's checkpoint files, shared by every strategy (so a checkpoint resumes under any strategy and rank
count):

- ``model/``: the weights in HF format (safetensors, HF names; a tied LM head stored once).
- ``learner_state.pt``: ``format`` ("fqn"), ``optimizer`` (the whole optimizer state keyed by parameter name),
  ``num_updates``, ``rng`` (torch, Python and NumPy generator states), and per strategy ``lora`` (a ``model.lora``
  run) or ``master_weights`` (DeepSpeed's fp32 masters of a 16-bit model).

The learner classes gather and write; these functions are the file format.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    """The torch, Python and NumPy generator states."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def write_learner_state(path: Path, optimizer: dict, num_updates: int, **extra) -> None:
    """``path/learner_state.pt``: the optimizer state keyed by parameter name, the update count, the generator
    states taken now, and ``extra`` (``lora``, ``master_weights``)."""
    state = {"format": "fqn", "optimizer": optimizer, "num_updates": num_updates, "rng": rng_state(), **extra}
    buf = io.BytesIO()
    torch.save(state, buf)
    (path / "learner_state.pt").write_bytes(buf.getvalue())


def read_model_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``path/model``'s weights by state-dict name of ``model``; a tied LM head, saved once, gets the embedding's
    tensor. Anything else missing or unexpected is an error naming the names."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "model" / "model.safetensors"))
    entries = model.state_dict(keep_vars=True)
    if model.config.tie_word_embeddings and "lm_head.weight" in entries and "lm_head.weight" not in weights:
        emb = model.get_input_embeddings().weight
        name = next(k for k, v in entries.items() if v is emb and k != "lm_head.weight")
        weights["lm_head.weight"] = weights[name]
    missing, unexpected = sorted(set(entries) - set(weights)), sorted(set(weights) - set(entries))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path}: missing {missing}, unexpected {unexpected}")
    return weights


def read_learner_state(path: Path) -> dict:
    """``path/learner_state.pt`` as :func:`write_learner_state` wrote it (or an older format: the caller checks
    ``format``)."""
    return torch.load(path / "learner_state.pt", weights_only=False)
