"""``model.lora``'s weight sync: the learner's adapter alone, to every engine, each loading it as a new LoRA
request (``rollout.engine.Engine.load_adapter``). The canary then scores its probe through that same request, as
every rollout is generated, so an adapter that does not arrive (or arrives stale) fails the run."""

from __future__ import annotations

import time


def push_adapter(learner, engines: list, version: int, bucket_bytes: int = 0) -> dict[str, float]:
    """The adapter's files (``Learner.export_adapter``) into every engine through the object store, in one piece
    (``bucket_bytes`` is not used: an adapter is a few MiB). Each engine serves ``version`` once it has loaded
    the adapter; a load that fails raises ``rl.driver.WeightSyncError`` naming the engine, the others keep their
    version until the next sync."""
    import ray

    from rl.driver import _wait_all

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
