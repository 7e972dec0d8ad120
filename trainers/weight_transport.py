"""The learner's side of a collective weight transport: learner rank 0 and every engine worker in one group,
rank 0 broadcasting each bucket (``rl.weight_wire``'s layout) to the workers, which load it in place.

``gloo`` is the CPU transport: a standalone ``ProcessGroupGloo`` over a ``TCPStore`` that learner rank 0 hosts, so
neither the learners' own process group nor vLLM's is touched. Engine workers join it through vLLM's
weight-transfer API (``rollout.weight_transfer.GlooWeightTransferEngine``, backend ``gloo``), as they would join
vLLM's NCCL transfer group on GPUs. Only rank 0 sends; the other learner ranks take part in the gathers of every
bucket (FSDP2's ``full_tensor``, ZeRO-3's gathered parameters) and nothing else.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from rl.weight_wire import BucketMeta, pack


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
