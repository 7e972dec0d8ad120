"""The wire format of one weight bucket on a collective transport (gloo on CPU): every tensor's bytes back to back
in one flat ``uint8`` buffer, each at an offset aligned to ``ALIGN_BYTES``, described by the bucket's metadata
(names, dtype names, shapes: the fields of vLLM's ``NCCLWeightTransferUpdateInfo``).

The sender (``trainers.weight_transport``) packs, the engine's worker (``rollout.weight_transfer``) unpacks; both
compute the layout from the same metadata, so one broadcast per bucket carries it and the receiver's tensors are
views of its receive buffer (no copy before the model's ``load_weights``).

The ``rl_ipc`` transport sends no bytes: the buffer is shared (``shared_buffer``: CUDA IPC on a GPU, a
shared-memory file on CPU) and the receiver maps it by its handle (``open_shared_buffer``).
"""

from __future__ import annotations

import os
import uuid
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


def pack(meta: BucketMeta, tensors: list[torch.Tensor], out: torch.Tensor | None = None,
         device: torch.device | str | None = None) -> torch.Tensor:
    """One ``uint8`` buffer with ``tensors`` at ``layout(meta)``'s offsets: ``out`` (``layout(meta)[1]`` bytes, e.g.
    a shared-memory file's), else a new buffer on ``device`` (default CPU). Each tensor must match its metadata
    exactly (name order is the caller's; dtype and shape are checked here)."""
    if len(tensors) != len(meta.names):
        raise ValueError(f"bucket metadata names {len(meta.names)} tensors, got {len(tensors)}")
    offsets, total = layout(meta)
    if out is not None and (out.dtype != torch.uint8 or out.numel() != total):
        raise ValueError(f"pack: the output buffer holds {out.numel()} {out.dtype}, the bucket needs {total} uint8")
    buf = out if out is not None else torch.zeros(total, dtype=torch.uint8, device=device)
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


def shared_buffer(nbytes: int, device: torch.device, directory: str) -> tuple[torch.Tensor, dict]:
    """A ``uint8`` buffer of ``nbytes`` that another process on this node can map, and its handle (plain data, for
    an RPC): on a CUDA ``device`` the ``rebuild_cuda_tensor`` arguments of ``torch.multiprocessing``'s IPC, keyed by
    the GPU's physical UUID (the processes may number their visible GPUs differently); on CPU a file in
    ``directory`` (the caller removes it with ``release_shared_buffer``)."""
    if device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        gpu = str(torch.cuda.get_device_properties(device).uuid)
        return buf, {"cuda": {gpu: list(reduce_tensor(buf)[1])}, "nbytes": nbytes}
    path = os.path.join(directory, f"rl_weights_{os.getpid()}_{uuid.uuid4().hex[:12]}")
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8), {"path": path, "nbytes": nbytes}


def release_shared_buffer(handle: dict) -> None:
    """The sender is done with a ``shared_buffer``: its file goes (mappings still open stay valid until closed)."""
    if handle.get("path"):
        try:
            os.unlink(handle["path"])
        except FileNotFoundError:
            pass


def open_shared_buffer(handle: dict, nbytes: int, device: torch.device) -> torch.Tensor:
    """Map the buffer of a ``shared_buffer`` handle (``nbytes`` expected) in this process."""
    if handle.get("nbytes") != nbytes:
        raise ValueError(f"the shared buffer holds {handle.get('nbytes')} bytes, the bucket needs {nbytes}")
    if "cuda" in handle:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = str(torch.cuda.get_device_properties(index).uuid)
        if gpu not in handle["cuda"]:
            raise RuntimeError(f"the learner's buffer is on GPU {sorted(handle['cuda'])}, this engine worker on {gpu}: "
                               "rl_ipc shares one GPU's memory (placement.mode=colocated)")
        args = list(handle["cuda"][gpu])
        args[6] = index  # the receiver's own index of that GPU
        return rebuild_cuda_tensor(*args)
    path = handle.get("path") or ""
    if not os.path.isfile(path) or os.path.getsize(path) != nbytes:
        raise FileNotFoundError(f"shared weight buffer {path!r} is not on this node or not {nbytes} bytes: rl_ipc needs "
                                "the engine on the learner's node (placement.mode=colocated)")
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
