"""Shared pieces of the distributed learner tests: a tiny random Qwen2 checkpoint, random train samples, a port."""

from __future__ import annotations

import socket

import torch

from rl.types import TrainSample


def save_tiny_qwen2(path, vocab: int = 50, hidden: int = 64, intermediate: int = 128, heads: int = 1,
                    kv_heads: int = 1, max_len: int = 64, tie: bool = True) -> str:
    """A 2-layer random-init Qwen2 (head dim 64) saved in ``path``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
                      max_position_embeddings=max_len, tie_word_embeddings=tie)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def random_samples(n: int = 10, seed: int = 0, vocab: int = 50, prompt_len: tuple[int, int] = (2, 6),
                   response_len: tuple[int, int] = (1, 12), behaviour: float = -3.0,
                   group_size: int = 5) -> list[TrainSample]:
    """``n`` samples with random prompt/response ids, advantages cycling -1, 0, 1, groups of ``group_size``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(1, vocab, (int(torch.randint(*prompt_len, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(1, vocab, (int(torch.randint(*response_len, (1,), generator=g)),), generator=g).tolist()
        out.append(TrainSample(p, r, [behaviour] * len(r), advantage=float(i % 3) - 1.0,
                               group_id=f"g{i // group_size}"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
