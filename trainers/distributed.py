"""The learner's process group: rank bookkeeping, FSDP2 sharding, data split and reductions.

One code path for 1 and N ranks. ``learner.strategy=single`` runs one rank without a process group; ``fsdp2``
forms a torch process group over ``learner.num_ranks`` ranks (gloo on CPU, NCCL on CUDA; each rank is a Ray actor
holding a :class:`trainers.learner.Learner`) and shards the policy with ``fully_shard``: every decoder layer is its
own FSDP unit and the root unit holds the rest (embeddings, final norm, LM head). The root is the log-prob module
(:class:`LogProbModule`), so the fused log-prob kernels run inside its forward and see the gathered LM-head weight.

Data parallelism: every rank receives the whole step's samples and takes its share of each mini-batch
(:func:`assign_to_ranks`, balanced by tokens). Losses are normalized by the token/sequence counts of the whole
mini-batch and the gradient reduce-scatter sums (divide factor 1), so the update equals the one-rank update.
FSDP's collectives need every rank to run the same number of forward/backward passes: ranks with fewer
micro-batches run zero-weight padding passes (:func:`max_over_ranks`).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from rl.config import FsdpConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The config's dtype names (``model.dtype``, ``learner.param_dtype``, ``learner.fsdp.reduce_dtype``)."""


class LogProbModule(torch.nn.Module):
    """Wraps the causal LM so the whole log-prob computation (decoder, LM head or fused kernel) is one forward:
    under FSDP2 this module is the root unit, so the LM-head weight is gathered while the kernels read it.

    ``autocast_dtype``: run the forward under ``torch.autocast`` in this dtype (mixed precision of the unsharded
    ``single`` strategy: fp32 parameters, bf16 matmuls; the backward follows the forward's dtypes). None: the
    parameters' own dtype (FSDP2 casts its gathered parameters itself)."""

    def __init__(self, lm: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.autocast_dtype = autocast_dtype

    def forward(self, mb, temperature: float, with_entropy: bool, kernels):
        from trainers.logprob import token_logprobs  # (trainers.logprob imports this module)

        if self.autocast_dtype is None:
            logp, entropy = token_logprobs(self.lm, mb, temperature, with_entropy=with_entropy, kernels=kernels)
        else:
            with torch.autocast(device_type=mb.input_ids.device.type, dtype=self.autocast_dtype):
                logp, entropy = token_logprobs(self.lm, mb, temperature, with_entropy=with_entropy, kernels=kernels)
        # FSDP hooks the root's outputs for backward; return fresh tensors, not views of the logits
        return logp.clone(), entropy


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port (for rank 0's rendezvous)."""
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        ip = "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ip, port


def init_process_group(rank: int, world_size: int, master: tuple[str, int], device: torch.device,
                       timeout_s: float = 1800.0, init_timeout_s: float = 300.0) -> None:
    """Join the learners' process group (gloo on CPU, NCCL on CUDA). The rendezvous at rank 0's ``master`` must
    complete within ``init_timeout_s``: a rank that never arrives (wrong address, a firewall, a dead node) is an
    error naming the address, not a silent wait. On CUDA the group is bound to this process's device
    (``device_id``), so NCCL's communicator is created here, eagerly, and not at the first collective.
    ``timeout_s`` bounds every later collective."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", master[0])
    os.environ.setdefault("MASTER_PORT", str(master[1]))
    try:
        store = dist.TCPStore(master[0], int(master[1]), world_size, is_master=rank == 0,
                              timeout=timedelta(seconds=init_timeout_s))
        store.set(f"rl_rank_{rank}", "up")
        store.wait([f"rl_rank_{r}" for r in range(world_size)], timedelta(seconds=init_timeout_s))
    except RuntimeError as e:
        raise RuntimeError(
            f"learner rank {rank}/{world_size}: the process group's rendezvous at {master[0]}:{master[1]} did not "
            f"complete within {init_timeout_s:.0f} s (learner.init_timeout_s): {str(e).splitlines()[0][:200]}. "
            "Check that every learner node reaches that address (firewall, NCCL_SOCKET_IFNAME / "
            "GLOO_SOCKET_IFNAME on multi-NIC nodes) and that every rank started.") from None
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **group_device_kwargs(device))


def group_device_kwargs(device: torch.device) -> dict:
    """``device_id`` for ``init_process_group`` on CUDA (the process's current device), nothing on CPU."""
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_device(index)
    return {"device_id": torch.device("cuda", index)}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def shard_with_fsdp2(root: LogProbModule, fsdp_cfg: FsdpConfig, device: torch.device, trainable: bool = True,
                     compute_dtype: torch.dtype | None = None) -> None:
    """``fully_shard`` each decoder layer, then the root. The shards (and so the gradients and the AdamW state)
    keep the parameters' dtype; ``compute_dtype`` is the dtype the gathered parameters compute in (FSDP2's
    ``MixedPrecisionPolicy.param_dtype``; None: the parameters' own). Gradients are reduced in
    ``fsdp_cfg.reduce_dtype`` (``learner.fsdp``). Gradient reduction sums (divide factor 1): losses are already
    normalized by global counts."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=DTYPES[fsdp_cfg.reduce_dtype])
    kwargs: dict[str, Any] = dict(mp_policy=mp, reshard_after_forward=fsdp_cfg.reshard_after_forward)
    if fsdp_cfg.cpu_offload and device.type == "cuda":
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = getattr(root.lm.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"learner.strategy=fsdp2: {type(root.lm).__name__} has no decoder `layers` to shard")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    if trainable:
        for m in root.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)


def assign_to_ranks(lengths: list[int], n_ranks: int) -> list[list[int]]:
    """Indices split over ranks, balanced by length (longest first to the least loaded rank); each rank's list
    is in index order. Deterministic."""
    loads = [0] * n_ranks
    out: list[list[int]] = [[] for _ in range(n_ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(n_ranks), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += lengths[i]
    return [sorted(x) for x in out]


def max_over_ranks(value: int) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return int(t.item())


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Sum of a metrics dict over ranks; a key a rank lacks counts 0 there (a rank that ran only padding passes
    reports no loss metrics)."""
    if not is_distributed():
        return dict(values)
    keys = sorted({k for part in gather_objects(sorted(values)) for k in part})
    t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=_cpu_group())
    return dict(zip(keys, t.tolist()))


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite host ``tensors`` with rank 0's, in place (no-op without a process group; over gloo, also when the
    learners' group is NCCL)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t, 0, group=_cpu_group())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_cpu_group())
    return out


_CPU_GROUP = None


def _cpu_group():
    """A gloo group for small CPU-side reductions (NCCL groups need CUDA tensors)."""
    global _CPU_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def whole_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape under any strategy: an FSDP2 DTensor reports its global shape; a DeepSpeed ZeRO-3
    partitioned parameter holds an empty tensor and keeps its shape in ``ds_shape``."""
    return getattr(param, "ds_shape", param.shape)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; a collective when sharded: all ranks must call it."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def barrier() -> None:
    if is_distributed():
        dist.barrier(group=_cpu_group())


def destroy() -> None:
    global _CPU_GROUP
    if is_distributed():
        dist.destroy_process_group()
    _CPU_GROUP = None
