"""Every packed-attention backend registers with transformers under a name that transformers resolves as a plain
attention function. transformers treats any implementation name containing "flash" as a flash-attention kernel to
import (from flash-attn or a hub repository), which crashed the learner at start-up wherever flash-attn was installed.
"""

import pytest
import torch
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM

from trainers.packing import ATTENTION_BACKENDS, attn_implementation_name, register_packed_attention


def _tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS.names())
def test_every_backend_resolves_as_a_registered_attention_function(backend):
    name = attn_implementation_name(backend)
    assert "flash" not in name.lower()
    register_packed_attention()
    assert name in AttentionInterface._global_mapping
    model = _tiny_qwen2()
    # transformers' own resolution: a name it took for a flash kernel raises here (no flash-attn on this machine)
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    # the resolved function is ours: a plain (unpacked) forward runs through it and equals SDPA's
    ids = torch.randint(0, 32, (1, 7))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
