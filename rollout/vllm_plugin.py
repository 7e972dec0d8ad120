"""Two engine-core calls for adaptive speculative decoding, added to vLLM's ``EngineCore``.

vLLM's scheduler picks the number of speculative tokens K of every step from a dense ``batch size -> K`` table
(``Scheduler.dynamic_sd_lookup``, built from ``speculative_config["num_speculative_tokens_per_batch_size"]`` at
start-up). The scheduler lives in the engine-core process, which the worker extension (``rollout.worker_ext``)
cannot reach, so this module adds two methods to ``EngineCore`` that the client calls as utilities
(``EngineCoreClient.call_utility``):

- ``rl_set_spec_schedule(ranges)``: replace the table with ``[(first batch size, last batch size, K), ...]``
  (K = 0: no drafting for those batch sizes; K is capped at the engine's ``num_speculative_tokens``). Takes effect
  at the next scheduling step, in a running engine.
- ``rl_spec_step_stats(reset)``: per ``(batch size, K)``, the decode steps run, tokens produced and seconds spent,
  measured around every step; what the K bandit learns from.

On vLLM's CPU build it also repairs one kernel: the CPU fallback of the rejection sampler's ``expand_kernel``
(``vllm.utils.cpu_triton_utils._expand_kernel_impl``) casts its output to int64 into a copy that it never writes
back, so the per-token temperatures (float32) and top-k values (int32) of speculative decoding's random sampling
are left uninitialized, and every sampled request decodes from a corrupted distribution (greedy requests are not
affected; measured: with an EAGLE drafter at temperature 1, half of the tiny model's answers became garbage,
sampled log-probs equal to a uniform distribution's). ``register`` replaces it, before vLLM registers its CPU
kernels, with a plain torch version that writes into the output in its own dtype.

It also registers the project's weight transports, backends ``gloo``, ``rl_nccl`` and ``rl_ipc`` of vLLM's
weight-transfer API (``rollout.weight_transfer``), which an engine's worker creates when the engine starts with
``weight_transfer_config={"backend": ...}``.

It is registered as a vLLM general plugin (entry point ``vllm.general_plugins`` in ``pyproject.toml``), which vLLM
loads in every one of its processes, the engine core included; ``rollout.engine`` also calls ``register()`` in
its own process (for an in-process engine core). The step timer wraps the scheduler of an engine only once that
engine is asked for statistics or a schedule, so other engines run unchanged.
"""

from __future__ import annotations

import time


def register() -> None:
    """Add the ``rl_*`` methods to ``EngineCore``, repair the CPU expand kernel and register the weight
    transfer engines (``rollout.weight_transfer``) with vLLM (idempotent)."""
    _repair_cpu_expand_kernel()
    _register_weight_transfers()
    try:
        from vllm.v1.engine.core import EngineCore
    except ImportError:  # a vLLM without the v1 engine: nothing to patch
        return
    if getattr(EngineCore, "rl_set_spec_schedule", None) is None:
        EngineCore.rl_set_spec_schedule = _set_spec_schedule
        EngineCore.rl_spec_step_stats = _spec_step_stats


WEIGHT_TRANSFER_ENGINES = {"gloo": "GlooWeightTransferEngine", "rl_nccl": "NcclWeightTransferEngine",
                           "rl_ipc": "IpcWeightTransferEngine"}
"""Backend of vLLM's weight-transfer API -> the class in ``rollout.weight_transfer`` that serves it."""


def _register_weight_transfers() -> None:
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:  # a vLLM without the weight-transfer API
        return
    # the names only: rollout.weight_transfer is imported when an engine asks for one of them
    for backend, cls in WEIGHT_TRANSFER_ENGINES.items():
        if backend not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(backend, "rollout.weight_transfer", cls)


def expand_to_tokens(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:
    """What vLLM's ``expand_kernel`` computes: request ``i``'s value (``replace_to`` where it equals
    ``replace_from``) written to its tokens ``cu_num_tokens[i-1]:cu_num_tokens[i]`` of ``output``, in place and
    in ``output``'s dtype; positions after the last request's tokens are left as they are."""
    import torch

    cu = cu_num_tokens.to(torch.int64)
    if cu.numel() == 0:
        return
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    n = int(cu[-1])
    output[:n] = torch.repeat_interleave(values, counts).to(output.dtype)


def _repair_cpu_expand_kernel() -> None:
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # not a build with the CPU kernel fallbacks
        return
    if getattr(cpu_triton_utils, "_expand_kernel_impl", None) is not expand_to_tokens:
        cpu_triton_utils._expand_kernel_impl = expand_to_tokens


class _StepTimer:
    """Wraps one scheduler's ``schedule`` and ``update_from_output``: a step is timed from its schedule call (or
    the end of the previous step, if later: pipelined steps overlap) to the end of its output processing. Only
    decode steps count: no new request, no prompt chunk (each request scheduled at most 1 + K tokens)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.stats: dict[tuple[int, int], list[float]] = {}
        self.started: dict[int, float] = {}
        self.last_end = 0.0
        self._schedule = scheduler.schedule
        self._update = scheduler.update_from_output
        scheduler.schedule = self.schedule
        scheduler.update_from_output = self.update_from_output

    def current_k(self, batch_size: int) -> int:
        lookup = self.scheduler.dynamic_sd_lookup
        if lookup is not None and batch_size > 0:
            return int(lookup[min(batch_size, len(lookup) - 1)])
        return int(self.scheduler.num_spec_tokens)

    def schedule(self, *args, **kwargs):
        out = self._schedule(*args, **kwargs)
        self.started[id(out)] = time.perf_counter()
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        result = self._update(scheduler_output, model_runner_output)
        end = time.perf_counter()
        t0 = self.started.pop(id(scheduler_output), None)
        if t0 is not None:
            per_req = scheduler_output.num_scheduled_tokens
            batch = len(per_req)
            k = self.current_k(batch)
            decode = (batch > 0 and not scheduler_output.scheduled_new_reqs
                      and max(per_req.values()) <= 1 + k)
            if decode:
                produced = sum(len(t) for t in (model_runner_output.sampled_token_ids or []))
                row = self.stats.setdefault((batch, k), [0.0, 0.0, 0.0])
                row[0] += 1
                row[1] += produced
                row[2] += end - max(t0, self.last_end)
        self.last_end = end
        return result


def _timer(core) -> _StepTimer:
    timer = getattr(core, "_rl_step_timer", None)
    if timer is None:
        timer = core._rl_step_timer = _StepTimer(core.scheduler)
    return timer


def _set_spec_schedule(self, ranges) -> list[int]:
    """Replace the scheduler's ``batch size -> K`` table; returns the table's K for batch sizes 1, 2, ...,
    ``max_num_seqs``."""
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    scheduler = self.scheduler
    if not getattr(scheduler, "num_spec_tokens", 0):
        raise RuntimeError("rl_set_spec_schedule: this engine runs without speculative decoding "
                           "(start it with a speculative_config)")
    _timer(self)
    lookup = build_dynamic_sd_schedule_lookup(
        [tuple(int(x) for x in r) for r in ranges],
        vllm_max_batch_size=scheduler.scheduler_config.max_num_seqs,
        vllm_num_speculative_tokens=scheduler.num_spec_tokens,
    )
    scheduler.dynamic_sd_lookup = lookup
    return list(lookup[1:])


def _spec_step_stats(self, reset: bool = True) -> list[list[float]]:
    """``[[batch size, K, decode steps, tokens produced, seconds], ...]`` since the previous reset (the first call
    starts the timer and returns nothing)."""
    timer = _timer(self)
    rows = [[float(b), float(k), *v] for (b, k), v in sorted(timer.stats.items())]
    if reset:
        timer.stats = {}
    return rows
