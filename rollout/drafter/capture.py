"""The target's hidden states from a transformers model: drafter training data without a learner.

The state captured is ``output_hidden_states[-1]``: the last layer's output after the final norm, the state the LM
head reads and the one vLLM hands an EAGLE drafter. (A learner that already runs the policy forward gets it for
free; this helper recomputes it, e.g. in tests and offline warm starts.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rollout.drafter.buffer import DrafterSequence


@torch.no_grad()
def capture_hidden_states(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    prompt_lengths: Sequence[int] | None = None,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> list[DrafterSequence]:
    """One ``DrafterSequence`` per token sequence, in order.

    model:          a transformers causal LM (the target), run in eval mode on its device.
    sequences:      token ids (prompt + response).
    prompt_lengths: when given, only response positions count for the loss (``loss_mask[j] = j >= prompt_length``);
                    otherwise every position does.
    dtype:          of the returned hidden states (on CPU).
    """
    if prompt_lengths is not None and len(prompt_lengths) != len(sequences):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(sequences)} sequences")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("empty token sequence")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[DrafterSequence] = []
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = [list(s) for s in sequences[start : start + batch_size]]
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            # Right padding: causal attention keeps the real positions exactly as they are unpadded.
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            last = res.hidden_states[-1].to("cpu", dtype)
            for i, s in enumerate(chunk):
                n = len(s)
                loss_mask = None
                if prompt_lengths is not None:
                    loss_mask = torch.arange(n) >= int(prompt_lengths[start + i])
                out.append(DrafterSequence(torch.tensor(s, dtype=torch.long), last[i, :n].clone(), loss_mask))
    finally:
        model.train(was_training)
    return out
