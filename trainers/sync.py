"""The weight sync, driver side: the learner's weights (or its LoRA adapter) into every engine over
``sync.transport``, then the canary that proves the engines serve them.

Transports: ``object_store`` (safetensors bytes through Ray's object store, ``push_weights``), ``gloo`` / ``nccl``
(vLLM's weight-transfer API: learner rank 0 broadcasts each bucket to every engine worker) and ``ipc`` (the engines
map the learner's shared buffer), both through ``push_weights_transfer``, and ``adapter`` (``model.lora``: the
adapter alone, each engine loading it as a new LoRA request, ``push_adapter``). The learner side is
``trainers.weight_transport``; the engine side ``rollout.weight_transfer``.
"""

from __future__ import annotations

import functools
import time


class CanaryError(RuntimeError):
    """The engines do not serve the weights the learner has: rollouts would be off-policy without anyone knowing."""

class LearnerGroup:
    """The learner ranks (Ray actors of ``trainers.learner.Learner`` in one process group). Every call goes to all
    ranks with the same arguments (the model methods are collectives under FSDP2) and returns rank 0's answer."""

    def __init__(self, actors: list) -> None:
        self.actors = actors

    def submit(self, method: str, *args, **kwargs) -> list:
        """Start ``method`` on every rank; the per-rank object refs (rank 0 first). Arguments go into the object
        store once, not once per rank."""
        import ray

        if len(self.actors) > 1:
            args = tuple(ray.put(a) for a in args)
            kwargs = {k: ray.put(v) for k, v in kwargs.items()}
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call(self, method: str, *args, **kwargs):
        import ray

        return ray.get(self.submit(method, *args, **kwargs))[0]


def push_weights(learner: LearnerGroup, engines: list, version: int, bucket_bytes: int) -> dict[str, float]:
    """The learner's whole weights into every engine, in buckets of about ``bucket_bytes`` (0: one piece) through
    the object store. The learner gathers bucket b+1 while the engines load bucket b: at most two buckets are in
    flight. Returns ``perf/weight_sync_s`` (all of it), ``perf/weight_load_s`` (the slowest engine's own loading;
    the rest is the learner's gather and serialization and the transfer, less what overlapped), bytes, buckets."""
    import ray

    t0 = time.perf_counter()
    n = learner.call("begin_weight_export", bucket_bytes)
    others, loading, infos = [], [], []
    for b in range(n):
        refs = learner.submit("next_weight_bucket", b)  # rank 0's ref carries the bytes
        others += refs[1:]
        loads = [e.load_weight_bucket.remote(refs[0], version, b == n - 1) for e in engines]
        infos += ray.get(loading)
        loading = loads
    infos += ray.get(loading)
    ray.get(others)
    per_engine = [sum(float(i["sync_s"]) for i in infos[k::len(engines)]) for k in range(len(engines))]
    return {"perf/weight_sync_s": time.perf_counter() - t0, "perf/weight_load_s": max(per_engine),
            "sync/weight_version": float(version), "sync/buckets": float(n),
            "sync/bytes": float(sum(i["bytes"] for i in infos[::len(engines)]))}


class WeightSyncError(RuntimeError):
    """A weight sync that broke off: the message names the engine (or learner rank) and the bucket. ``actor_error``
    is Ray's ``RayActorError`` when the cause was an actor that died (the run then reports it as that actor's
    death, with what was saved)."""

    def __init__(self, message: str, what: str = "weight sync", actor_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.what = what
        self.actor_error = actor_error


def _wait_all(labelled: list[tuple[str, object]], what: str) -> list:
    """``ray.get`` of every ref, in order, returning as soon as one fails: a ``WeightSyncError`` naming its label
    (``engine 1``, ``learner rank 0 (sender)``) and ``what``. The others are left running (a broken transfer group
    ends them at its timeout)."""
    import ray
    from ray.exceptions import RayActorError

    index = {ref: k for k, (_, ref) in enumerate(labelled)}
    results: list = [None] * len(labelled)
    pending = [ref for _, ref in labelled]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        k = index[ready[0]]
        try:
            results[k] = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - a task's error or a dead actor, reported with who and where
            cause = getattr(e, "cause", None) or e
            text = str(cause).strip().splitlines()
            raise WeightSyncError(f"{what} broke off on {labelled[k][0]}: {type(cause).__name__}: "
                                  f"{text[-1][:500] if text else ''}",
                                  what, actor_error=e if isinstance(e, RayActorError) else None) from None
    return results


def init_weight_transfer(learner: LearnerGroup, engines: list, tensor_parallel_size: int, timeout_s: float,
                         transport: str = "gloo") -> float:
    """Set up ``sync.transport`` (resolved) on both sides. ``gloo`` / ``nccl``: form the transfer group of learner
    rank 0 (the sender, rank 0 of the group, hosting its rendezvous) and every engine's workers (engine i at ranks
    ``1 + i * tensor_parallel_size`` onwards: each engine its own offset). ``ipc``: the sender and the engines'
    transfer engines start (nothing to join). Returns seconds."""
    import ray

    t0 = time.perf_counter()
    if transport == "ipc":
        sends = learner.submit("init_weight_transport", None, None, 0, timeout_s, transport)
        joins = [e.init_weight_transfer.remote({}) for e in engines]
        what = "the ipc weight transfer's start"
    else:
        address, port = ray.get(learner.actors[0].weight_transport_address.remote())
        world = 1 + len(engines) * tensor_parallel_size
        sends = learner.submit("init_weight_transport", address, port, world, timeout_s, transport)
        joins = [e.init_weight_transfer.remote({"master_address": address, "master_port": port,
                                                "rank_offset": 1 + i * tensor_parallel_size, "world_size": world,
                                                "timeout_s": timeout_s})
                 for i, e in enumerate(engines)]
        what = f"the weight transfer group's rendezvous at {address}:{port} ({world} ranks)"
    _wait_all([(f"engine {i}", r) for i, r in enumerate(joins)] + list(zip(_rank_labels(learner), sends)), what)
    return time.perf_counter() - t0


def _rank_labels(learner: LearnerGroup) -> list[str]:
    return [f"learner rank {k}" + (" (sender)" if k == 0 else "") for k in range(len(learner.actors))]


def _start_bucket(learner: LearnerGroup, engines: list, meta: dict, handoff: bool, what: str, method: str,
                  *args) -> tuple[list, dict | None]:
    """Start one bucket's transfer: the learner ranks' ``method`` (gather; rank 0 sends) and every engine's
    ``update_weights``. A collective transport runs them together (they meet in the broadcast; each call queued
    behind the previous bucket's on its actor) and returns them all to wait for. ``handoff`` (``ipc``): rank 0
    packs into a shared buffer first, then the engines get its handle; returns the engines' calls and rank 0's
    result."""
    sends = list(zip(_rank_labels(learner), learner.submit(method, *args)))
    if handoff:
        sent = _wait_all(sends, what)[0]
        meta = {**meta, "handle": sent.pop("handle")}
        return [(f"engine {i}", e.update_weights.remote(meta)) for i, e in enumerate(engines)], sent
    return [(f"engine {i}", e.update_weights.remote(meta)) for i, e in enumerate(engines)] + sends, None


def _await_bucket(started: tuple[list, dict | None], what: str, num_engines: int) -> dict:
    """Wait for a bucket ``_start_bucket`` started; returns rank 0's send result (gather, pack and send times)."""
    labelled, handed = started
    results = _wait_all(labelled, what)
    return handed if handed is not None else results[num_engines]


def push_weights_transfer(learner: LearnerGroup, engines: list, version: int, bucket_bytes: int,
                          handoff: bool = False) -> dict[str, float]:
    """``push_weights`` over vLLM's weight-transfer API (``sync.transport`` gloo / nccl / ipc, set up by
    ``init_weight_transfer``): every engine starts an update; per bucket, the learner ranks gather it and rank 0
    sends it (a broadcast, or a shared buffer's handle: ``handoff``) while the engines receive and load it
    (``update_weights`` with the bucket's names, dtypes and shapes), the next bucket's gather overlapping the
    engines' loading; then every engine finishes (checks that every parameter arrived, clears its prefix cache,
    serves ``version``). The engines' version moves only in that last call, so a sync that breaks off (a
    ``WeightSyncError`` naming the engine and the bucket) leaves every engine at its old version."""
    t0 = time.perf_counter()
    n = learner.call("begin_weight_export", bucket_bytes, False)
    metas = learner.call("weight_bucket_meta")
    _wait_all([(f"engine {i}", e.start_weight_update.remote()) for i, e in enumerate(engines)],
              f"weight sync to version {version} (start)")
    sent: list[dict] = []
    in_flight: list[tuple[str, tuple]] = []
    for b in range(n + 1):
        if b < n:
            what = f"weight sync to version {version} at bucket {b + 1}/{n}"
            in_flight.append((what, _start_bucket(learner, engines, metas[b], handoff, what, "send_weight_bucket", b)))
        if len(in_flight) == 2 or (b == n and in_flight):
            what, started = in_flight.pop(0)
            sent.append(_await_bucket(started, what, len(engines)))
    done = _wait_all([(f"engine {i}", e.finish_weight_update.remote(version)) for i, e in enumerate(engines)],
                     f"weight sync to version {version} (finish: every parameter must have arrived)")
    if handoff:
        learner.call("release_weight_buffers")
    return {"perf/weight_sync_s": time.perf_counter() - t0,
            "perf/weight_load_s": max(d["load_s"] + d["finish_s"] for d in done),
            "perf/weight_gather_s": sum(s["gather_s"] for s in sent),
            "perf/weight_send_s": sum(s["pack_s"] + s["send_s"] for s in sent),
            "sync/weight_version": float(version), "sync/buckets": float(n),
            "sync/bytes": float(sum(s["bytes"] for s in sent))}


def push_drafter_transfer(learner: LearnerGroup, engines: list, handoff: bool = False) -> dict[str, float]:
    """The speculative drafter's own weights into every engine over the weight transfer, as one bucket: vLLM's
    ``start_draft_weight_update`` retargets the engines' transfer engine at the drafter for this update (the
    embedding and LM head it shares with the target are not sent). The target's version does not move."""
    meta = learner.call("drafter_transfer_meta")
    _wait_all([(f"engine {i}", e.start_weight_update.remote(True)) for i, e in enumerate(engines)],
              "drafter publish (start)")
    started = _start_bucket(learner, engines, meta, handoff, "drafter publish", "send_drafter")
    sent = _await_bucket(started, "drafter publish", len(engines))
    _wait_all([(f"engine {i}", e.finish_weight_update.remote(None)) for i, e in enumerate(engines)],
              "drafter publish (finish)")
    if handoff:
        learner.call("release_weight_buffers")
    return {"bytes": float(sent["bytes"])}



def push_adapter(learner: LearnerGroup, engines: list, version: int, bucket_bytes: int = 0) -> dict[str, float]:
    """The adapter's files (``Learner.export_adapter``) into every engine through the object store, in one piece
    (``bucket_bytes`` is not used: an adapter is a few MiB). Each engine serves ``version`` once it has loaded
    the adapter; a load that fails raises ``WeightSyncError`` naming the engine, the others keep their
    version until the next sync."""
    import ray

    t0 = time.perf_counter()
    files = learner.call("export_adapter")
    if not files:
        raise RuntimeError("adapter sync: the learner has no adapter (it was not started with model.lora)")
    ref = ray.put(files)
    done = _wait_all([(f"engine {i}", e.load_adapter.remote(ref, version)) for i, e in enumerate(engines)],
                     f"adapter sync to version {version}")
    return {"perf/weight_sync_s": time.perf_counter() - t0,
            "perf/weight_load_s": max(d["sync_s"] for d in done),
            "sync/weight_version": float(version), "sync/buckets": 1.0,
            "sync/bytes": float(sum(len(b) for b in files.values())),
            "sync/adapter_id": float(max(d["lora_id"] for d in done))}


WEIGHT_PUSH = {"object_store": push_weights, "gloo": push_weights_transfer, "nccl": push_weights_transfer,
               "ipc": functools.partial(push_weights_transfer, handoff=True), "adapter": push_adapter}
"""``sync.transport`` (resolved; ``adapter`` with ``model.lora``) -> the push that runs it."""
ENGINE_WEIGHT_TRANSFER = {"object_store": None, "gloo": "gloo", "nccl": "rl_nccl", "ipc": "rl_ipc", "adapter": None}
"""``sync.transport`` (resolved) -> the backend of vLLM's weight-transfer API the engines start with
(``rollout.weight_transfer``)."""


def canary_gap(want: list[list[float]], got: list[list[float]]) -> tuple[float, float]:
    """(mean, max) absolute difference of two sets of per-token log-probs of the same sequences."""
    if [len(w) for w in want] != [len(g) for g in got]:
        raise ValueError(f"canary: token counts differ ({[len(w) for w in want]} vs {[len(g) for g in got]})")
    diffs = [abs(a - b) for w, g in zip(want, got) for a, b in zip(w, g)]
    return sum(diffs) / max(len(diffs), 1), max(diffs, default=0.0)



class WeightSync:
    """The run's sync: ``push`` the learner's weights to the engines over the configured transport, then the
    ``canary`` (engine vs learner log-probs on a fixed probe, per engine, each against its bound). ``version`` is
    the policy version the engines serve."""

    def __init__(self, cfg, learner: LearnerGroup, engines: list) -> None:
        self.cfg = cfg
        self.learner = learner
        self.engines = engines
        self.version = 0
        self.probe: list[tuple[list[int], list[int]]] | None = None

    def set_probe(self, groups) -> None:
        """The canary's fixed probe: the prompts and responses of ``groups`` (one rollout each)."""
        self.probe = [(g[0].prompt_token_ids, g[0].response_token_ids or [g[0].prompt_token_ids[-1]]) for g in groups]

    def sync_weights(self, version: int) -> dict[str, float]:
        """``push`` then ``canary``: for engines that are awake."""
        return {**self.push(version), **self.canary(version)}

    def push(self, version: int) -> dict[str, float]:
        """Learner -> engines over ``sync.transport`` (``WEIGHT_PUSH``). A sleeping engine needs its weights awake
        for this, and every tag awake before anything generates (``canary``)."""
        push = WEIGHT_PUSH[self.cfg.weight_transport()]
        out = push(self.learner, self.engines, version, int(self.cfg.sync.bucket_mb * 2**20))
        self.version = version
        return out

    def canary(self, version: int) -> dict[str, float]:
        """The canary's metrics after a sync (nothing when ``sync.canary`` is off); raises ``CanaryError``."""
        if not self.cfg.sync.canary or self.probe is None:
            return {}
        return self.check_canary(version)

    def check_canary(self, version: int) -> dict[str, float]:
        """Engine vs learner log-probs on the fixed probe, per engine: the mean and the largest absolute difference,
        each against its bound (``SyncConfig.canary_bounds``, per dtype by default). Generates on every engine, so
        every engine must be fully awake."""
        import ray

        want = self.learner.call("probe_logprobs", self.probe)
        dtype = self.cfg.canary_dtype()
        mean_bound, max_bound = self.cfg.sync.canary_bounds(dtype)
        worst_mean = worst_max = 0.0
        for i, got in enumerate(ray.get([e.score_tokens.remote(self.probe) for e in self.engines])):
            mean, largest = canary_gap(want, got)
            worst_mean, worst_max = max(worst_mean, mean), max(worst_max, largest)
            if mean > mean_bound or largest > max_bound:
                raise CanaryError(
                    f"weight sync canary failed on engine {i} at version {version}: engine and learner log-probs on "
                    f"the probe differ by {mean:.3g} on average (bound {mean_bound:.3g}) and {largest:.3g} at most "
                    f"(bound {max_bound:.3g}; sync.canary_mean_abs_diff / sync.canary_max_abs_diff, defaults for "
                    f"{dtype}). The engine is not serving the learner's weights (or runs another dtype or kernel).")
        return {"sync/canary_max_abs_diff": worst_max, "sync/canary_mean_abs_diff": worst_mean}
