"""A gloo weight-transfer engine for vLLM's weight-transfer API: the CPU transport that follows the protocol of
vLLM's NCCL engine (``vllm.distributed.weight_transfer.nccl_engine``), so CPU runs exercise the control flow of
the GPU transports.

Registered as backend ``gloo`` by ``rollout.vllm_plugin.register`` (vLLM loads the plugin in its worker
processes), and selected with ``LLM(weight_transfer_config={"backend": "gloo"})``. The engine's worker then
answers vLLM's own control plane (``LLM.init_weight_transfer_engine``, ``start_weight_update`` /
``start_draft_weight_update``, ``update_weights``, ``finish_weight_update``):

- init: join the transfer group (a ``ProcessGroupGloo`` over the ``TCPStore`` learner rank 0 hosts) as rank
  ``rank_offset + worker rank``; every engine gets its own offset (vLLM's NCCL trainer gives all engines the same).
- start: vLLM's layerwise reload (``initialize_layerwise_reload``), as its NCCL and IPC engines do.
- update (one call per bucket): receive the bucket's bytes with one broadcast (``rl.weight_wire`` layout; the
  update info carries the names, dtype names and shapes, as NCCL's does) and hand views of them to the model's
  ``load_weights``; a layer is processed (on CPU: its weights repacked) once all of it has arrived, so buckets hold
  whole decoder layers.
- finish: ``finalize_layerwise_reload``, then check that every parameter of the model arrived in this sync (a
  tensor missing from the export fails the sync instead of leaving a stale layer behind).

A receive that fails (the sender stopped, an engine of the group died: the group's timeout) finalizes the reload
at once, which puts the previous weights back into every layer that had not arrived, and re-raises with the
bucket's position in the sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo

from rl.weight_wire import BucketMeta, layout, unpack

BACKEND = "gloo"


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Where the transfer group meets and this engine's place in it."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 300.0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """One bucket: its tensors' names, dtype names and whole shapes, in the order the sender packed them."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket: int = 0
    num_buckets: int = 1


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo
    supports_draft_weight_update = True

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self._store = None
        self._loaded: set[str] = set()
        self._active = False
        self.rank = -1
        self.stats = {"recv_s": 0.0, "load_s": 0.0, "bytes": 0.0}

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        pc = self.parallel_config
        self.rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        timeout = timedelta(seconds=init_info.timeout_s)
        self._store = dist.TCPStore(init_info.master_address, int(init_info.master_port), init_info.world_size,
                                    is_master=False, timeout=timeout)
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("rl_weight_transfer", self._store), self.rank,
                                           init_info.world_size, timeout)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)
        self._loaded, self._active = set(), True
        self.stats = {"recv_s": 0.0, "load_s": 0.0, "bytes": 0.0}

    def update_weights(self, update_info: dict) -> None:
        # the base class synchronizes an accelerator after every chunk; a gloo receive is complete when it returns
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialized: call init_weight_transfer_engine first")
        meta = BucketMeta(update_info.names, update_info.dtype_names, update_info.shapes)
        t0 = time.perf_counter()
        try:
            buf = torch.empty(layout(meta)[1], dtype=torch.uint8)
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.group.broadcast([buf], opts).wait()
        except Exception as e:  # noqa: BLE001 - any transport error ends this sync; the caller sees which bucket
            self.abort()
            raise RuntimeError(f"gloo weight transfer: bucket {update_info.bucket + 1}/{update_info.num_buckets} "
                               f"({len(meta.names)} tensors, first {meta.names[:1]}) did not arrive at transfer rank "
                               f"{self.rank}: {str(e).splitlines()[0][:300]}") from None
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

    def shutdown(self) -> None:
        self.group = None
        self._store = None
