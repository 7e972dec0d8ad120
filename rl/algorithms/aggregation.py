"""Loss aggregation: per-token losses of one micro-batch -> this micro-batch's share of the step loss.

The normalizers (token and sequence counts) are those of the whole optimizer step, over all
micro-batches and all data-parallel ranks, and are passed in by the learner. So the returned values
*add up*: the sum over the step's micro-batches (and ranks) equals the loss of the full batch in one
piece, whatever the split (grad accumulation 1x8 == 8x1). Data-parallel backends that average
gradients across ranks (DDP, FSDP) then need the loss multiplied by the world size; that belongs to
the learner. Modes (``docs/algorithms.md`` "Loss aggregation", m = mask, l = per-token loss):

- ``token-mean``:              sum(m*l) / global_num_tokens
- ``seq-mean-token-mean``:     sum over sequences i of [sum_t m*l / sum_t m] / global_num_seqs
- ``seq-mean-token-sum``:      sum(m*l) / global_num_seqs
- ``seq-mean-token-sum-norm``: sum(m*l) / const_len (Dr. GRPO; no 1/num_seqs, as in verl)
"""

from __future__ import annotations

from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    seq_index: Tensor,
    mode: str,
    *,
    global_num_tokens: float,
    global_num_seqs: float,
    const_len: int | None = None,
    num_seqs: int | None = None,
) -> Tensor:
    """Scalar loss of one micro-batch, normalized by step-global counts.

    per_token_loss:    [T] float.
    mask:              [T] bool/float; only masked-in tokens count (and are counted).
    seq_index:         [T] long, sequence of each token in 0..num_seqs-1 (used by ``seq-mean-token-mean``).
    mode:              one of ``AGG_MODES``.
    global_num_tokens: masked-in tokens of the whole optimizer step (all micro-batches, all ranks).
    global_num_seqs:   sequences of the whole optimizer step (all micro-batches, all ranks).
    const_len:         the constant L of ``seq-mean-token-sum-norm``.
    num_seqs:          sequences in this micro-batch; defaults to ``seq_index.max() + 1``.

    A count of 0 is treated as 1 (an empty step has loss 0, not NaN). In ``seq-mean-token-mean`` a
    sequence with no masked-in tokens contributes 0 but still counts in ``global_num_seqs``.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    if global_num_tokens < 0 or global_num_seqs < 0:
        raise ValueError(f"normalizers must be >= 0, got tokens={global_num_tokens}, seqs={global_num_seqs}")
    m = mask.to(per_token_loss.dtype)
    masked = per_token_loss * m
    if mode == "token-mean":
        return masked.sum() / max(global_num_tokens, 1.0)
    if mode == "seq-mean-token-sum":
        return masked.sum() / max(global_num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        if const_len is None or const_len <= 0:
            raise ValueError("seq-mean-token-sum-norm needs a positive const_len (e.g. max_response_tokens)")
        return masked.sum() / const_len
    # seq-mean-token-mean
    if num_seqs is None:
        num_seqs = int(seq_index.max()) + 1 if seq_index.numel() else 0
    zeros = masked.new_zeros(num_seqs)
    seq_sum = zeros.index_add(0, seq_index, masked)
    seq_tokens = zeros.index_add(0, seq_index, m)
    return (seq_sum / seq_tokens.clamp(min=1)).sum() / max(global_num_seqs, 1.0)

