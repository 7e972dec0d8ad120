"""Training data for the drafter: sequences with the target's hidden states, kept for the most recent RL steps.

The target changes every RL step, so only recent steps describe it: the buffer keeps at most ``max_steps`` steps
and ``max_tokens`` tokens in all, and drops the oldest sequences first (oldest step first, then in the order they
were added).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class DrafterSequence:
    """One sequence as the target processed it.

    token_ids:     [T] prompt and response tokens.
    hidden_states: [T, H] the target's last hidden state at each position (after its final norm: what vLLM hands
                   the drafter).
    loss_mask:     [T] bool or None (all): position ``j`` counts as a training target, i.e. the drafter is taught to
                   predict ``hidden_states[j]`` and the token after it from position ``j - 1``. For drafting
                   responses only, ``j >= prompt_length`` (the first draft comes after the first sampled token).
    """

    token_ids: torch.Tensor
    hidden_states: torch.Tensor
    loss_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        t = self.token_ids.shape[0]
        if self.token_ids.dim() != 1 or self.hidden_states.dim() != 2 or self.hidden_states.shape[0] != t:
            raise ValueError(f"token_ids must be [T] and hidden_states [T, H]; got {tuple(self.token_ids.shape)} "
                             f"and {tuple(self.hidden_states.shape)}")
        if self.loss_mask is not None and tuple(self.loss_mask.shape) != (t,):
            raise ValueError(f"loss_mask must be [T={t}], got {tuple(self.loss_mask.shape)}")

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class DrafterBatch:
    """Right-padded sequences.

    input_ids:     [B, T] long (padding: 0).
    hidden_states: [B, T, H] (padding: 0).
    lengths:       [B] long, real tokens per row.
    loss_mask:     [B, T] bool: real positions that count as targets (``DrafterSequence.loss_mask``).
    target_logits: [B, T, V] or None: the target's logits at each position. When None the soft labels are
                   recomputed as ``lm_head(hidden_states)``, which is the same thing for a target whose LM head reads
                   that hidden state directly (Llama, Qwen2; no logit scaling).
    """

    input_ids: torch.Tensor
    hidden_states: torch.Tensor
    lengths: torch.Tensor
    loss_mask: torch.Tensor
    target_logits: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def collate(sequences: Sequence[DrafterSequence], dtype: torch.dtype = torch.float32) -> DrafterBatch:
    """Pad ``sequences`` to one batch; hidden states cast to ``dtype``."""
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    b, t, h = len(sequences), max(len(s) for s in sequences), sequences[0].hidden_states.shape[1]
    ids = torch.zeros(b, t, dtype=torch.long)
    hidden = torch.zeros(b, t, h, dtype=dtype)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, s in enumerate(sequences):
        n = len(s)
        ids[i, :n] = s.token_ids
        hidden[i, :n] = s.hidden_states.to(dtype)
        mask[i, :n] = True if s.loss_mask is None else s.loss_mask.bool()
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    return DrafterBatch(input_ids=ids, hidden_states=hidden, lengths=lengths, loss_mask=mask)


class DrafterBuffer:
    """Bounded FIFO of steps' sequences.

    ``max_steps``: steps kept (a new step beyond it evicts the oldest whole step). ``max_tokens``: tokens kept in
    all (the oldest sequences go until the rest fits; a sequence longer than ``max_tokens`` is not kept).
    ``storage_dtype``: hidden states are stored in it (e.g. bfloat16 halves the memory); batches are float32.
    """

    def __init__(self, max_steps: int, max_tokens: int, *, storage_dtype: torch.dtype | None = None) -> None:
        if max_steps < 1 or max_tokens < 1:
            raise ValueError(f"max_steps and max_tokens must be >= 1, got {max_steps} and {max_tokens}")
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.storage_dtype = storage_dtype
        self._steps: deque[tuple[int, deque[DrafterSequence]]] = deque()
        self._num_tokens = 0
        self._last_step: int | None = None
        self.num_evicted_sequences = 0

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def num_sequences(self) -> int:
        return sum(len(seqs) for _, seqs in self._steps)

    @property
    def steps(self) -> list[int]:
        """Step ids held, oldest first."""
        return [step for step, _ in self._steps]

    def add_step(self, step: int, sequences: Iterable[DrafterSequence]) -> None:
        """Add one RL step's sequences (``step`` increasing; a step without sequences is not kept), then evict down
        to the bounds."""
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"steps must be added in increasing order: got {step} after {self._last_step}")
        self._last_step = step
        kept: deque[DrafterSequence] = deque()
        for s in sequences:
            if self.storage_dtype is not None:
                s = DrafterSequence(s.token_ids, s.hidden_states.to(self.storage_dtype), s.loss_mask)
            kept.append(s)
            self._num_tokens += len(s)
        if not kept:
            return
        self._steps.append((step, kept))
        while len(self._steps) > self.max_steps:
            _, dropped = self._steps.popleft()
            self._num_tokens -= sum(len(s) for s in dropped)
            self.num_evicted_sequences += len(dropped)
        while self._num_tokens > self.max_tokens:
            _, oldest = self._steps[0]
            s = oldest.popleft()
            self._num_tokens -= len(s)
            self.num_evicted_sequences += 1
            if not oldest:
                self._steps.popleft()

    def sequences(self) -> list[DrafterSequence]:
        """All held sequences, oldest first."""
        return [s for _, seqs in self._steps for s in seqs]

    def sample_batch(self, batch_size: int, rng: random.Random) -> DrafterBatch:
        """``batch_size`` sequences drawn uniformly without replacement (all of them when fewer are held)."""
        pool = self.sequences()
        if not pool:
            raise ValueError("the drafter buffer is empty")
        picked = pool if len(pool) <= batch_size else rng.sample(pool, batch_size)
        return collate(picked)
