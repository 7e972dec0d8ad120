"""The project's engines for vLLM's weight-transfer API: three transports over one control flow, so that CPU runs
exercise what GPU runs do.

- ``gloo`` (CPU, any placement): a gloo group of learner rank 0 and every engine worker; each bucket is one
  broadcast of a flat byte buffer (``rl.weight_wire``), the protocol of vLLM's NCCL engine
  (``vllm.distributed.weight_transfer.nccl_engine``) with a gloo group.
- ``rl_nccl`` (CUDA, disaggregated): the same, over vLLM's ``PyNcclCommunicator`` (joined with its
  ``stateless_init_process_group``, as vLLM's NCCL engine joins) into a buffer on the worker's GPU. Only the group
  and the buffer's device differ from ``gloo``.
- ``rl_ipc`` (colocated: learner and engine on one node): no group. The learner packs each bucket into a shared
  buffer and the bucket's update info carries its handle: CUDA IPC on GPUs (``torch.multiprocessing``'s
  ``rebuild_cuda_tensor`` arguments by physical GPU UUID, as vLLM's IPC engine does), a shared-memory file on CPU.
  The worker maps it and loads views of it.

Registered by ``rollout.vllm_plugin.register`` (vLLM loads the plugin in its worker processes) and selected with
``LLM(weight_transfer_config={"backend": ...})``. The engine's worker then answers vLLM's own control plane
(``LLM.init_weight_transfer_engine``, ``start_weight_update`` / ``start_draft_weight_update``, ``update_weights``,
``finish_weight_update``):

- init: join the transfer group (``gloo``, ``rl_nccl``) as rank ``rank_offset + worker rank``; every engine gets its
  own offset (vLLM's NCCL trainer gives all engines the same). ``rl_ipc`` has nothing to join.
- start: vLLM's layerwise reload (``initialize_layerwise_reload``), as its NCCL and IPC engines do.
- update (one call per bucket): receive the bucket's bytes (update info: names, dtype names and shapes, as NCCL's
  does) and hand views of them to the model's ``load_weights``; a layer is processed (on CPU: its weights repacked)
  once all of it has arrived, so buckets hold whole decoder layers.
- finish: ``finalize_layerwise_reload``, then check that every parameter of the model arrived in this sync (a
  tensor missing from the export fails the sync instead of leaving a stale layer behind).

A receive that fails (the sender stopped, an engine of the group died: the group's timeout; a handle that cannot be
opened) finalizes the reload at once, which puts the previous weights back into every layer that had not arrived,
and re-raises with the bucket's position in the sync. (NCCL has no receive timeout: a sender that dies mid-bucket
leaves the worker waiting; the driver reports the dead learner.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo

from rl.weight_wire import BucketMeta, layout, open_shared_buffer, unpack

@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Where the transfer group meets and this engine's place in it (``gloo`` and ``rl_nccl``)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 300.0


@dataclass
class IpcWeightTransferInitInfo(WeightTransferInitInfo):
    """``rl_ipc`` has no group to join."""


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """One bucket: its tensors' names, dtype names and whole shapes, in the order the sender packed them."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket: int = 0
    num_buckets: int = 1


@dataclass
class IpcWeightTransferUpdateInfo(GlooWeightTransferUpdateInfo):
    """One bucket and the handle of the shared buffer that holds it (``trainers.weight_transport.IpcSender``):
    ``{"path": ..., "nbytes": ...}`` (a shared-memory file, CPU) or ``{"cuda": {gpu uuid: rebuild args}}``."""

    handle: dict | None = None


class _LayerwiseTransferEngine:
    """What the three engines share: the layerwise reload around a sync, loading each bucket's views and recording
    what arrived, the completeness check at finish, and putting the old weights back when a receive fails.
    Each engine below says how a bucket's bytes arrive: ``_receive_buffer(update_info, nbytes)``."""

    backend = ""

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._loaded: set[str] = set()
        self._active = False
        self.rank = -1
        self.stats = {"recv_s": 0.0, "load_s": 0.0, "bytes": 0.0}

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)
        self._loaded, self._active = set(), True
        self.stats = {"recv_s": 0.0, "load_s": 0.0, "bytes": 0.0}

    def update_weights(self, update_info: dict) -> None:
        # the base class synchronizes an accelerator after every chunk; these receives are complete when they return
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info) -> None:
        meta = BucketMeta(update_info.names, update_info.dtype_names, update_info.shapes)
        t0 = time.perf_counter()
        try:
            buf = self._receive_buffer(update_info, layout(meta)[1])
        except Exception as e:  # noqa: BLE001 - any transport error ends this sync; the caller sees which bucket
            self.abort()
            raise RuntimeError(f"{self.backend} weight transfer: bucket {update_info.bucket + 1}/"
                               f"{update_info.num_buckets} ({len(meta.names)} tensors, first {meta.names[:1]}) did not "
                               f"arrive at transfer rank {self.rank}: {str(e).splitlines()[0][:300]}") from None
        t1 = time.perf_counter()
        self._loaded |= set(self.model.load_weights(weights=unpack(meta, buf)) or ())
        self.stats["recv_s"] += t1 - t0
        self.stats["load_s"] += time.perf_counter() - t1
        self.stats["bytes"] += float(buf.numel())

    def abort(self) -> None:
        """End a broken sync: the layers that did not arrive get their previous weights back."""
        if self._active:
            self.finish_weight_update(check=False)

    def finish_weight_update(self, check: bool = True) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        self._active = False
        finalize_layerwise_reload(self.model, self.model_config)
        if check and self.model is self._default_model:
            # the drafter's export leaves out the embedding and LM head it shares with the target
            missing = sorted({n for n, _ in self.model.named_parameters()} - self._loaded)
            if missing:
                raise RuntimeError(f"weight sync left {len(missing)} parameter(s) of the engine's model unloaded "
                                   f"(the learner's export lacks them): {missing[:8]}")

    def _group_rank(self, rank_offset: int = 0) -> int:
        """This worker's rank: its place among the engine's workers (all data-parallel groups) plus the offset."""
        pc = self.parallel_config
        return pc.data_parallel_index * pc.world_size + pc.rank + rank_offset


class GlooWeightTransferEngine(_LayerwiseTransferEngine,
                               WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo
    supports_draft_weight_update = True
    backend = "gloo"

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self._store = None

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        self.rank = self._group_rank(init_info.rank_offset)
        timeout = timedelta(seconds=init_info.timeout_s)
        self._store = dist.TCPStore(init_info.master_address, int(init_info.master_port), init_info.world_size,
                                    is_master=False, timeout=timeout)
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("rl_weight_transfer", self._store), self.rank,
                                           init_info.world_size, timeout)

    def _receive_buffer(self, update_info, nbytes: int) -> torch.Tensor:
        if self.group is None:
            raise RuntimeError("the transfer group is not initialized: call init_weight_transfer_engine first")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([buf], opts).wait()
        return buf

    def shutdown(self) -> None:
        self.group = None
        self._store = None


class NcclWeightTransferEngine(GlooWeightTransferEngine):
    """``gloo``'s protocol over NCCL: the group is vLLM's ``PyNcclCommunicator`` and the bucket arrives in a buffer
    on the worker's GPU (``load_weights`` then copies from GPU memory)."""

    backend = "rl_nccl"

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        self.rank = self._group_rank(init_info.rank_offset)
        self.group = stateless_init_process_group(init_info.master_address, int(init_info.master_port), self.rank,
                                                  init_info.world_size, device=self.device)

    def _receive_buffer(self, update_info, nbytes: int) -> torch.Tensor:
        if self.group is None:
            raise RuntimeError("the transfer group is not initialized: call init_weight_transfer_engine first")
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.group.broadcast(buf, src=0, stream=torch.cuda.current_stream())
        return buf

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
        self.group = None


class IpcWeightTransferEngine(_LayerwiseTransferEngine,
                              WeightTransferEngine[IpcWeightTransferInitInfo, IpcWeightTransferUpdateInfo]):
    init_info_cls = IpcWeightTransferInitInfo
    update_info_cls = IpcWeightTransferUpdateInfo
    supports_draft_weight_update = True
    backend = "rl_ipc"

    def init_transfer_engine(self, init_info: IpcWeightTransferInitInfo) -> None:
        self.rank = self._group_rank()

    def _receive_buffer(self, update_info: IpcWeightTransferUpdateInfo, nbytes: int) -> torch.Tensor:
        return open_shared_buffer(update_info.handle or {}, nbytes, self.device)

    def shutdown(self) -> None:
        pass
