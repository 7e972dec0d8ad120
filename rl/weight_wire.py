"""The wire format of one weight bucket on a collective transport (gloo on CPU): every tensor's bytes back to back
in one flat ``uint8`` buffer, each at an offset aligned to ``ALIGN_BYTES``, described by the bucket's metadata
(names, dtype names, shapes: the fields of vLLM's ``NCCLWeightTransferUpdateInfo``).

The sender (``trainers.weight_transport``) packs, the engine's worker (``rollout.weight_transfer``) unpacks; both
compute the layout from the same metadata, so one broadcast per bucket carries it and the receiver's tensors are
views of its receive buffer (no copy before the model's ``load_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN_BYTES = 64
"""Each tensor starts at a multiple of this, so a view of the buffer in the tensor's dtype is aligned."""


@dataclass(frozen=True)
class BucketMeta:
    """What one bucket holds, in order: HF names, dtype names (``"float32"``, ``"bfloat16"``) and whole shapes."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
            raise ValueError(f"bucket metadata: {len(self.names)} names, {len(self.dtype_names)} dtypes, "
                             f"{len(self.shapes)} shapes")

    def as_dict(self) -> dict:
        return {"names": list(self.names), "dtype_names": list(self.dtype_names), "shapes": [list(s) for s in self.shapes]}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout(meta: BucketMeta) -> tuple[list[int], int]:
    """(byte offset of every tensor, total bytes of the buffer)."""
    offsets, end = [], 0
    for dname, shape in zip(meta.dtype_names, meta.shapes):
        start = -(-end // ALIGN_BYTES) * ALIGN_BYTES
        numel = 1
        for d in shape:
            numel *= int(d)
        offsets.append(start)
        end = start + numel * torch.empty(0, dtype=getattr(torch, dname)).element_size()
    return offsets, end


def pack(meta: BucketMeta, tensors: list[torch.Tensor]) -> torch.Tensor:
    """One ``uint8`` CPU buffer with ``tensors`` at ``layout(meta)``'s offsets. Each tensor must match its metadata
    exactly (name order is the caller's; dtype and shape are checked here)."""
    if len(tensors) != len(meta.names):
        raise ValueError(f"bucket metadata names {len(meta.names)} tensors, got {len(tensors)}")
    offsets, total = layout(meta)
    buf = torch.zeros(total, dtype=torch.uint8)
    for name, dname, shape, off, t in zip(meta.names, meta.dtype_names, meta.shapes, offsets, tensors):
        if dtype_name(t.dtype) != dname or list(t.shape) != list(shape):
            raise ValueError(f"weight {name!r}: metadata says {dname} {list(shape)}, the tensor is "
                             f"{dtype_name(t.dtype)} {list(t.shape)}")
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        buf[off:off + flat.numel()].copy_(flat)
    return buf


def unpack(meta: BucketMeta, buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry of a buffer ``pack`` built; the tensors are views of ``buf``."""
    offsets, total = layout(meta)
    if buf.dtype != torch.uint8 or buf.numel() != total:
        raise ValueError(f"bucket buffer of {buf.numel()} {buf.dtype} bytes, the metadata needs {total} uint8")
    out = []
    for name, dname, shape, off in zip(meta.names, meta.dtype_names, meta.shapes, offsets):
        dtype = getattr(torch, dname)
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        out.append((name, buf[off:off + nbytes].view(dtype).view(list(shape))))
    return out
