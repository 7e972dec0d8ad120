"""Offline acceptance: replay greedy speculative decoding with the drafter over the target's own greedy outputs.

For a sequence the target produced greedily, greedy verification accepts a draft token exactly when it equals the
sequence's next token. Replaying vLLM's loop (draft ``K`` tokens from the last known position, accept the matching
prefix, add the target's bonus token, draft again from there) gives the mean acceptance length the engine would
measure, without an engine: a check of a drafter before it is pushed, and of the training layout against vLLM's.

vLLM counts a round's accepted drafts before it applies the stop condition, so drafts past the end-of-sequence
token count as accepted when they equal the target's greedy continuation there. To reproduce the engine's counters
exactly, pass sequences extended by the target's greedy continuation (``num_speculative_tokens`` more tokens, with
their hidden states) and the real ends as ``sequence_ends``; without that the replay stops at the sequence's end and
slightly undercounts the last round of each sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rollout.drafter.buffer import DrafterSequence
from rollout.drafter.metrics import SpecDecodeCounters
from rollout.drafter.model import Drafter


@torch.no_grad()
def replay_greedy_acceptance(
    drafter: Drafter,
    sequences: Sequence[DrafterSequence],
    prompt_lengths: Sequence[int],
    num_speculative_tokens: int,
    sequence_ends: Sequence[int] | None = None,
) -> SpecDecodeCounters:
    """Counters of greedy speculative decoding over each sequence's response (``token_ids[prompt_length:end]``).

    ``sequence_ends``: where generation stopped (default: each sequence's length); tokens after it, when present,
    are the target's greedy continuation and only serve to check drafts of the last rounds.

    The first round drafts after the first response token (the engine samples it from the prefill); each round
    reads the target's hidden states up to the last verified position and feeds the drafter's own predictions
    back for the later draft tokens, as vLLM does. Rounds stop once no token is left to verify.
    """
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    was_training = drafter.training
    drafter.eval()
    k = num_speculative_tokens
    drafts = accepted = 0
    per_pos = [0] * k
    ends = [len(s) for s in sequences] if sequence_ends is None else list(sequence_ends)
    if len(prompt_lengths) != len(sequences) or len(ends) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences, {len(prompt_lengths)} prompt lengths, {len(ends)} ends")
    for seq, prompt_len, end in zip(sequences, prompt_lengths, ends):
        ids, hidden = seq.token_ids, seq.hidden_states.float()
        n = len(seq)
        t = prompt_len - 1  # x[t+1] is known (the first response token); the drafter guesses x[t+2], ...
        while t + 2 < end:
            in_ids, in_hidden = ids[1 : t + 2], hidden[: t + 1]  # (x[i+1], h[i]) for i <= t
            match = 0
            for j in range(k):
                f = drafter(in_ids[None], in_hidden[None])[0, -1]
                guess = int(drafter.logits(f).argmax())
                if match == j and t + 2 + j < n and guess == int(ids[t + 2 + j]):
                    match += 1
                in_ids = torch.cat([in_ids, torch.tensor([guess])])
                in_hidden = torch.cat([in_hidden, f[None]])
            drafts += 1
            accepted += match
            for j in range(match):
                per_pos[j] += 1
            t += match + 1  # the accepted drafts and the target's bonus token
    drafter.train(was_training)
    return SpecDecodeCounters(drafts, drafts * k, accepted, tuple(per_pos))


@torch.no_grad()
def extend_greedy(model: torch.nn.Module, sequences: Sequence[Sequence[int]], num_tokens: int) -> list[list[int]]:
    """Each sequence followed by ``num_tokens`` greedy tokens of ``model`` (a transformers causal LM), ignoring
    end-of-sequence tokens: the continuation ``replay_greedy_acceptance`` checks the last rounds' drafts against."""
    device = next(model.parameters()).device
    out = []
    for seq in sequences:
        ids = list(seq)
        for _ in range(num_tokens):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits
            ids.append(int(logits[0, -1].argmax()))
        out.append(ids)
    return out
