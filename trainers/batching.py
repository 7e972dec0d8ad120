"""Micro-batches: train samples laid out as right-padded rows or packed rows, and per-token values in and out.

A micro-batch holds B sequences, either right-padded (R = B rows) or packed back to back (R = 1 row,
``trainers.packing``). Position t of a row predicts token t+1 of that row, so every per-token tensor of a
micro-batch is [R, L-1]; :func:`response_values` scatters per-response-token values into that layout and
:func:`gather_response` reads them back per sample.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rl.types import TrainSample
from trainers.packing import pack_groups, packed_positions


@dataclass
class MicroBatch:
    """B sequences, right-padded (R = B rows) or packed back to back (R = 1 row). Position t of a row predicts
    token t+1 of that row.

    input_ids:    [R, L]   prompt+response ids (padded with 0).
    attn_mask:    [R, L]   1 on real tokens (padded); None when packed.
    position_ids: [R, L]   restarting at 0 for each sequence (packed); None when padded.
    cu_seqlens:   [B+1]    int32 sequence offsets in the row (packed); None when padded.
    max_seqlen:   longest sequence (packed; 0 when padded).
    resp_mask:    [R, L-1] loss mask: 1 where position t predicts a trained response token.
    resp_pos:     [R, L-1] bool: True where position t predicts any response token (log-probs are needed there).
    seq_ids:      [R, L-1] long: the sequence (0..B-1 in this micro-batch) position t belongs to.
    targets:      [R, L-1] next-token ids.
    index:        which samples of the caller's list are in this micro-batch, in order.
    starts:       (row, column) of each sequence's first token, in ``index`` order.
    """

    input_ids: torch.Tensor
    attn_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    resp_mask: torch.Tensor
    resp_pos: torch.Tensor
    seq_ids: torch.Tensor
    targets: torch.Tensor
    index: list[int]
    starts: list[tuple[int, int]]

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


def response_mask(s: TrainSample) -> list[int]:
    """The sample's loss mask over its [R] response tokens (all ones when it has none)."""
    return s.loss_mask if s.loss_mask is not None else [1] * len(s.response_token_ids)


def make_micro_batches(samples: list[TrainSample], token_budget: int, packed: bool = False) -> list[MicroBatch]:
    """Samples grouped into micro-batches of at most ``token_budget`` tokens (a longer single sample gets a
    micro-batch of its own). Padded: greedy in length order, padded tokens count. Packed: first-fit decreasing
    on real tokens (``trainers.packing.pack_groups``)."""
    if packed:
        groups = pack_groups([s.num_tokens for s in samples], token_budget)
        return [_collate_packed([samples[i] for i in g], g) for g in groups]
    order = sorted(range(len(samples)), key=lambda i: samples[i].num_tokens)
    groups: list[list[int]] = []
    for i in order:
        if groups:
            cur = groups[-1]
            longest = max(samples[j].num_tokens for j in cur + [i])
            if longest * (len(cur) + 1) <= token_budget:
                cur.append(i)
                continue
        groups.append([i])
    return [_collate([samples[i] for i in g], g) for g in groups]


def padding_batch(packed: bool) -> MicroBatch:
    """A one-token-prompt, one-token-response micro-batch: what a rank with fewer micro-batches than the others
    runs (with zero loss) so that every rank takes part in the same collectives."""
    return make_micro_batches([TrainSample([0], [0], [0.0], 0.0, "padding")], 1 << 20, packed=packed)[0]


def move_micro_batch(mb: MicroBatch, device: torch.device) -> MicroBatch:
    """``mb`` with every tensor on ``device``."""
    moved = {f.name: getattr(mb, f.name).to(device) for f in dataclasses.fields(mb)
             if isinstance(getattr(mb, f.name), torch.Tensor)}
    return dataclasses.replace(mb, **moved)


def _response_columns(s: TrainSample, col0: int) -> slice:
    """The columns of the [R, L-1] layout that predict ``s``'s response tokens when ``s`` starts at ``col0``:
    response token j sits at col0+p+j and is predicted at col0+p+j-1."""
    start = col0 + len(s.prompt_token_ids) - 1
    return slice(start, start + len(s.response_token_ids))


def _mark_response(resp: torch.Tensor, resp_pos: torch.Tensor, row: int, col0: int, s: TrainSample) -> None:
    cols = _response_columns(s, col0)
    resp[row, cols] = torch.tensor(response_mask(s), dtype=torch.float32)
    resp_pos[row, cols] = True


def _collate(samples: list[TrainSample], index: list[int]) -> MicroBatch:
    length = max(s.num_tokens for s in samples)
    b = len(samples)
    ids = torch.zeros(b, length, dtype=torch.long)
    attn = torch.zeros(b, length, dtype=torch.long)
    resp = torch.zeros(b, length - 1, dtype=torch.float32)
    resp_pos = torch.zeros(b, length - 1, dtype=torch.bool)
    for row, s in enumerate(samples):
        seq = s.prompt_token_ids + s.response_token_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        _mark_response(resp, resp_pos, row, 0, s)
    seq_ids = torch.arange(b).unsqueeze(1).expand(b, length - 1).clone()
    return MicroBatch(ids, attn, None, None, 0, resp, resp_pos, seq_ids, ids[:, 1:].clone(), index,
                      [(row, 0) for row in range(b)])


def _collate_packed(samples: list[TrainSample], index: list[int]) -> MicroBatch:
    lengths = [s.num_tokens for s in samples]
    position_ids, cu = packed_positions(lengths)
    ids = torch.tensor([t for s in samples for t in s.prompt_token_ids + s.response_token_ids]).unsqueeze(0)
    width = ids.shape[1] - 1
    resp = torch.zeros(1, width, dtype=torch.float32)
    resp_pos = torch.zeros(1, width, dtype=torch.bool)
    seq_ids = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths))[:width].unsqueeze(0)
    starts = []
    for k, s in enumerate(samples):
        col0 = int(cu[k])
        _mark_response(resp, resp_pos, 0, col0, s)
        starts.append((0, col0))
    return MicroBatch(ids, None, position_ids, cu, max(lengths), resp, resp_pos, seq_ids, ids[:, 1:].clone(), index,
                      starts)


def response_values(mb: MicroBatch, samples: list[TrainSample], values: list[list[float]]) -> torch.Tensor:
    """Per-response-token ``values`` (one [R_i] list per sample of ``samples``) scattered into the [R, L-1]
    layout of ``mb``; zeros elsewhere."""
    out = torch.zeros_like(mb.resp_mask)
    for (row, col0), i in zip(mb.starts, mb.index):
        if samples[i].response_token_ids:
            out[row, _response_columns(samples[i], col0)] = torch.tensor(values[i], dtype=torch.float32)
    return out


def gather_response(mb: MicroBatch, samples: list[TrainSample], tensor: torch.Tensor) -> list[list[float]]:
    """The [R_i] response values of each sample of ``mb`` (in ``mb.index`` order) read off an [R, L-1] tensor."""
    return [tensor[row, _response_columns(samples[i], col0)].tolist() for (row, col0), i in zip(mb.starts, mb.index)]
