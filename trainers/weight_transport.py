"""The learner's side of the weight transports of vLLM's weight-transfer API (the engines' side:
``rollout.weight_transfer``). Only learner rank 0 sends; the other ranks take part in the gathers of every bucket
(FSDP2's ``full_tensor``, ZeRO-3's gathered parameters) and nothing else.

- ``GlooSender`` (``gloo``, the CPU transport): rank 0 of a standalone ``ProcessGroupGloo`` over a ``TCPStore`` it
  hosts, so neither the learners' own process group nor vLLM's is touched; each bucket (``rl.weight_wire``'s
  layout) is one broadcast to every engine worker.
- ``NcclSender`` (``nccl``, CUDA, disaggregated): the same over vLLM's ``PyNcclCommunicator`` (rank 0 of its
  ``stateless_init_process_group``), the bucket packed on the learner's GPU.
- ``IpcSender`` (``ipc``, colocated): no group; each bucket is packed into a shared buffer (CUDA IPC, or a
  shared-memory file on CPU) whose handle the driver passes to the engines with the bucket's metadata. The buffers
  of the last two buckets stay alive (the driver keeps at most two in flight), older ones are released.

``make_sender`` picks one by the resolved ``sync.transport``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from rl.weight_wire import BucketMeta, layout, pack, release_shared_buffer, shared_buffer


def open_gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo group of ``world_size`` ranks over a ``TCPStore`` at ``address:port`` (hosted by rank 0); blocks
    until every rank has joined. ``timeout_s`` bounds the rendezvous and every later broadcast."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, int(port), world_size, is_master=rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore("rl_weight_transfer", store), rank, world_size, timeout), store


def broadcast(group, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


class GlooSender:
    """Rank 0 of the transfer group (the learner's sender)."""

    def __init__(self, address: str, port: int, world_size: int, timeout_s: float) -> None:
        if world_size < 2:
            raise ValueError(f"a weight transfer group needs the sender and at least one engine worker, got "
                             f"world_size={world_size}")
        self.world_size = world_size
        self.group, self._store = open_gloo_group(address, port, 0, world_size, timeout_s)

    def send(self, meta: BucketMeta, tensors: list[torch.Tensor]) -> dict[str, float]:
        """Broadcast one bucket; returns its bytes and the seconds spent packing and sending."""
        t0 = time.perf_counter()
        buf = pack(meta, tensors)
        t1 = time.perf_counter()
        broadcast(self.group, buf)
        return {"bytes": float(buf.numel()), "pack_s": t1 - t0, "send_s": time.perf_counter() - t1}

    def close(self) -> None:
        self.group = None
        self._store = None


class NcclSender(GlooSender):
    """Rank 0 of an NCCL transfer group (vLLM's ``PyNcclCommunicator``); buckets are packed on ``device``."""

    def __init__(self, address: str, port: int, world_size: int, timeout_s: float, device: torch.device) -> None:
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        if world_size < 2:
            raise ValueError(f"a weight transfer group needs the sender and at least one engine worker, got "
                             f"world_size={world_size}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.world_size, self.device, self._store = world_size, device, None
        self.group = stateless_init_process_group(address, int(port), 0, world_size, device=device)

    def send(self, meta: BucketMeta, tensors: list[torch.Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        buf = pack(meta, tensors, device=self.device)
        t1 = time.perf_counter()
        stream = torch.cuda.current_stream()
        self.group.broadcast(buf, src=0, stream=stream)
        stream.synchronize()  # the buffer is reused by the allocator once this returns
        return {"bytes": float(buf.numel()), "pack_s": t1 - t0, "send_s": time.perf_counter() - t1}

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy()
        self.group = None


class IpcSender:
    """Packs each bucket into a buffer the engine workers on this node map by its handle (``send`` returns it)."""

    keep = 2
    """Buffers alive at once: the driver waits for the engines to load bucket b before bucket b + 2 is packed."""

    def __init__(self, device: torch.device, directory: str | None = None) -> None:
        self.device, self.directory = device, directory
        self._live: list[tuple[torch.Tensor, dict]] = []

    def _dir(self, nbytes: int) -> str:
        """``/dev/shm`` when it has room for the buffers kept alive, else the temp directory (page-cached)."""
        if self.directory:
            return self.directory
        shm = "/dev/shm"
        if os.path.isdir(shm) and shutil.disk_usage(shm).free > (self.keep + 1) * nbytes:
            return shm
        return tempfile.gettempdir()

    def send(self, meta: BucketMeta, tensors: list[torch.Tensor]) -> dict:
        t0 = time.perf_counter()
        nbytes = layout(meta)[1]
        while len(self._live) >= self.keep:
            release_shared_buffer(self._live.pop(0)[1])
        buf, handle = shared_buffer(nbytes, self.device, self._dir(nbytes))
        self._live.append((buf, handle))
        pack(meta, tensors, out=buf)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # packed before an engine reads it
        return {"bytes": float(nbytes), "pack_s": time.perf_counter() - t0, "send_s": 0.0, "handle": handle}

    def close(self) -> None:
        while self._live:
            release_shared_buffer(self._live.pop()[1])


def make_sender(transport: str, address: str | None, port: int | None, world_size: int, timeout_s: float,
                device: torch.device):
    """The learner's sender for the resolved ``sync.transport`` (``gloo``, ``nccl``, ``ipc``)."""
    if transport == "gloo":
        return GlooSender(address, port, world_size, timeout_s)
    if transport == "nccl":
        return NcclSender(address, port, world_size, timeout_s, device)
    if transport == "ipc":
        return IpcSender(device)
    raise ValueError(f"no weight sender for sync.transport={transport!r}; senders: gloo, nccl, ipc")
