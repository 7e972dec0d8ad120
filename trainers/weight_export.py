"""The learner's weights out to the engines: the bucket plan and the export the driver walks bucket by bucket.

Every sync exports the whole weights in buckets of about ``sync.bucket_mb``, cut only between decoder layers
(:func:`plan_weight_buckets`). Every learner rank walks the same plan, since gathering a sharded tensor is a
collective; rank 0 then either builds safetensors bytes for the object store (``next_weight_bucket``) or hands the
bucket to its weight-transport sender (``send_weight_bucket``, ``trainers.weight_transport``). docs/architecture.md,
"Weight sync transports", describes the protocol around it.
"""

from __future__ import annotations

import itertools
import math
import re
import time

import torch

from rl.weight_wire import BucketMeta, dtype_name
from trainers import distributed as D

_LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+)\.")


def plan_weight_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Names in order, cut into buckets of about ``bucket_bytes`` (0: everything in one). A decoder layer
    (``...layers.N.*``) is never split: an inference engine fuses a layer's projections (q/k/v, gate/up) into one
    tensor that must be loaded whole; a layer larger than the bound gets a bucket of its own. Other entries
    (embedding, final norm, LM head) are units of one tensor."""
    if bucket_bytes < 0:
        raise ValueError(f"bucket_bytes must be >= 0, got {bucket_bytes}")

    def unit(entry: tuple[str, int]) -> str:
        m = _LAYER_PREFIX.match(entry[0])
        return m.group(1) if m else entry[0]

    buckets: list[list[str]] = [[]]
    filled = 0
    for _, group in itertools.groupby(sizes, key=unit):
        entries = list(group)
        size = sum(s for _, s in entries)
        if bucket_bytes and filled and filled + size > bucket_bytes:
            buckets.append([])
            filled = 0
        buckets[-1].extend(n for n, _ in entries)
        filled += size
    return buckets


class WeightExportMixin:
    """The weight export of :class:`trainers.learner.Learner` (its public methods are what the driver calls for a
    sync). It reads from the learner: ``model``, ``rank``, ``device``, ``export_dtype``, ``lora_model``, the
    strategy's gathers ``_full_weights`` / ``_whole_tensors``, ``_release_cached_memory``, and the online drafter
    (``drafter``, ``_shared_weight_names``), whose copies of the shared embedding and LM head follow every
    export."""

    _sender = None  # rank 0's weight-transport sender, once init_weight_transport ran

    def _weight_shapes(self) -> list[tuple[str, list[int]]]:
        """(HF name, whole shape) for every state-dict entry, in the order ``_full_weights`` yields them; read from
        metadata (a sharded parameter's whole shape, ``trainers.distributed.whole_shape``), nothing gathered."""
        return [(k, list(D.whole_shape(v))) for k, v in self.model.state_dict(keep_vars=True).items()]

    def _weight_sizes(self) -> list[tuple[str, int]]:
        """(HF name, whole tensor's bytes in ``export_dtype``) for every state-dict entry, in ``_weight_shapes``'
        order."""
        size = torch.empty(0, dtype=self.export_dtype).element_size()
        return [(k, math.prod(shape) * size) for k, shape in self._weight_shapes()]

    def begin_weight_export(self, bucket_bytes: int = 0, copy: bool = True) -> int:
        """Start an export of the whole weights in buckets of about ``bucket_bytes`` (0: one bucket), cut only
        between decoder layers (``plan_weight_buckets``); returns the number of buckets. Every rank then calls
        ``next_weight_bucket`` (or ``send_weight_bucket``) for each bucket in order (the gathers are collectives).
        ``copy=False``: the bucket's tensors may be the live parameters (``send_weight_bucket`` packs them into its
        send buffer, which is the copy)."""
        self._export_plan = plan_weight_buckets(self._weight_sizes(), bucket_bytes)
        # every rank's drafter replica reads the shared embedding and LM head (and keeps them: copies)
        sender_device = getattr(self._sender, "device", None)
        self._export_iter = self._full_weights(
            frozenset(self._shared_weight_names()) if self.drafter is not None else frozenset(),
            copy=copy or self.drafter is not None,
            device=sender_device if not copy and sender_device is not None and self.drafter is None else "cpu")
        self._export_shared: dict[str, torch.Tensor] = {}
        return len(self._export_plan)

    def weight_bucket_meta(self) -> list[dict]:
        """What each bucket of the started export holds (``rl.weight_wire.BucketMeta`` fields plus ``bucket`` and
        ``num_buckets``): the update info of vLLM's weight-transfer API, one per bucket, for the engines."""
        n = len(self._export_plan)
        return [{**self._bucket_meta(b).as_dict(), "bucket": b, "num_buckets": n} for b in range(n)]

    def _bucket_meta(self, index: int) -> BucketMeta:
        """Names, dtype (``export_dtype``: ``_full_weights`` casts every entry to it) and whole shapes of a bucket."""
        shapes = dict(self._weight_shapes())
        names = list(self._export_plan[index])
        return BucketMeta(names, [dtype_name(self.export_dtype)] * len(names), [shapes[x] for x in names])

    def weight_transport_address(self) -> tuple[str, int]:
        """This node's address and a free port for the transfer group's rendezvous (asked of rank 0, which hosts
        it)."""
        return D.free_address()

    def init_weight_transport(self, address: str | None, port: int | None, world_size: int, timeout_s: float,
                              transport: str = "gloo") -> float:
        """Rank 0 opens its sender for the resolved ``sync.transport`` (``trainers.weight_transport.make_sender``:
        for ``gloo`` / ``nccl`` it waits for the engine workers to join the transfer group); the other ranks only
        take part in the gathers. Returns seconds."""
        if self.rank != 0:
            return 0.0
        from trainers.weight_transport import make_sender

        t0 = time.perf_counter()
        if self._sender is not None:
            self._sender.close()
        self._sender = make_sender(transport, address, port, world_size, timeout_s, self.device)
        return time.perf_counter() - t0

    def send_weight_bucket(self, index: int) -> dict[str, float]:
        """Gather bucket ``index`` of the started export (every rank) and broadcast it to the engine workers (rank
        0); returns rank 0's bytes and seconds (gather, pack, send), nothing on the others."""
        t0 = time.perf_counter()
        bucket = self._next_bucket(index)
        if self.rank != 0:
            return {}
        gather_s = time.perf_counter() - t0
        meta = self._bucket_meta(index)  # what the engines were told; packing checks every tensor against it
        try:
            info = self._sender.send(meta, [bucket[x] for x in meta.names])
        except Exception as e:  # noqa: BLE001 - the transport's error, with the bucket's position
            raise RuntimeError(f"weight transfer: sending bucket {index + 1}/{len(self._export_plan)} failed: "
                               f"{str(e).splitlines()[0][:300]}") from None
        return {**info, "gather_s": gather_s}

    def release_weight_buffers(self) -> None:
        """After a sync over ``ipc``: the shared buffers of its last buckets are released (the engines have loaded
        them)."""
        if self.rank == 0 and self._sender is not None:
            self._sender.close()

    def next_weight_bucket(self, index: int) -> bytes | None:
        """Bucket ``index`` of the export ``begin_weight_export`` started: safetensors bytes of its whole tensors
        (HF names; tied tensors cloned so safetensors accepts them) on rank 0, None on the others. Sharded
        parameters are gathered one tensor at a time, so no rank holds more than its shard plus one bucket."""
        from safetensors.torch import save as st_save

        bucket = self._next_bucket(index)
        if self.rank != 0:
            return None
        return st_save(bucket)

    def _next_bucket(self, index: int) -> dict[str, torch.Tensor | None]:
        """Bucket ``index``'s whole tensors by name (None on ranks other than 0), gathered in the plan's order."""
        names = self._export_plan[index]
        bucket = {}
        for want in names:
            name, tensor = next(self._export_iter)
            if name != want:
                raise RuntimeError(f"weight export out of order: got {name!r}, planned {want!r}")
            bucket[name] = tensor
        if self.drafter is not None:  # the drafter trains against the target the engines serve (on every rank)
            shared = self._shared_weight_names()
            self._export_shared.update({n: bucket[n] for n in shared if n in bucket})
            if index == len(self._export_plan) - 1:
                self.drafter.set_shared_weights(*(self._export_shared[n] for n in shared))
                self._export_shared = {}
        if index == len(self._export_plan) - 1:
            self._release_cached_memory()  # the gathers' blocks go back to the device (the engines wake next)
        return bucket

    def export_weights(self) -> bytes | None:
        """The whole weights in one piece: ``next_weight_bucket`` of a one-bucket export."""
        self.begin_weight_export(0)
        return self.next_weight_bucket(0)

    def export_adapter(self) -> dict[str, bytes] | None:
        """``model.lora``: the adapter's files (``trainers.lora.adapter_files``) in the engines' dtype, what each
        sync sends; rank 0 (None elsewhere, and without LoRA). A collective when sharded: the adapter's tensors
        alone are gathered, one at a time (the frozen base never moves)."""
        from trainers.lora import adapter_files, is_adapter_key

        if self.lora_model is None:
            return None
        tensors = dict(self._whole_tensors(select=is_adapter_key, dtype=self.export_dtype))
        if self.rank != 0:
            return None
        return adapter_files(self.lora_model, tensors=tensors)
