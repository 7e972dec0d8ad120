"""`rl train` on the tiny CPU model with each weight transport: the canary passes after every sync (step 0's and
every step's), and the engines serve the version of the step. The gloo run has two engines (each its own rank
offset in the transfer group) and two FSDP2 learner ranks (a sender and a rank that only joins the gathers); the ipc
run is colocated (the engine maps the learner's shared-memory buckets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
FAST = ["run.progress=false", "data.eval.num_problems=8", "eval.num_samples=1", "eval.every_steps=0",
        "run.save_every_steps=0", "run.num_steps=2", "rollout.prompts_per_step=4", "rollout.num_samples_per_prompt=4",
        "sync.bucket_mb=0.5", "learner.lr=2e-3"]


def train(model_dir: str, out: Path, *overrides: str) -> tuple[dict[int, dict], str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "trainers.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={out}",
            f"model.path={model_dir}", "model.build_tiny=false", *FAST, *overrides]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}, proc.stdout


@pytest.mark.parametrize("transport, overrides", [
    ("gloo", ["rollout.num_engines=2", "learner.strategy=fsdp2", "learner.num_ranks=2", "learner.torch_threads=1"]),
    ("object_store", []),
    ("ipc", ["placement.mode=colocated"]),  # what auto picks for one colocated learner rank
])
def test_train_syncs_over_transport_with_canary(warm_tiny_model_dir, tmp_path, transport, overrides, request):
    if transport == "object_store":
        ray = request.getfixturevalue("ray_local")  # this process's cluster, for the run to attach to
        overrides = [*overrides, f"ray.address={ray.get_runtime_context().gcs_address}"]
    m, stdout = train(warm_tiny_model_dir, tmp_path / "run", f"sync.transport={transport}", *overrides)
    if transport == "object_store":
        from ray._private.state import actors  # Ray's state API needs the dashboard, which tests do not start

        assert ray.cluster_resources()["CPU"] == 4  # still up: a run that attached does not shut the cluster down

        def run_actors() -> dict[str, str]:  # the run's engine and learner in this cluster: class -> state
            return {a["ActorClassName"]: a["State"] for a in actors().values()
                    if a["ActorClassName"].endswith(("Engine", "Learner"))}

        deadline = time.monotonic() + 30  # the run's actors go with its driver; Ray reaps them in a moment
        while "ALIVE" in run_actors().values() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert run_actors() == {"Engine": "DEAD", "Learner": "DEAD"}  # they ran here, and none is left
    assert sorted(m) == [0, 1, 2]
    # the weights moved (a group with mixed rewards), so a sync that delivered nothing would fail the canary
    assert max(m[s]["loss/grad_norm"] for s in (1, 2)) > 0
    for step, r in m.items():
        assert r["sync/weight_version"] == step
        # fp32 engine and learner: the canary's bounds are 1e-4 mean / 1e-3 max; a garbled sync is ~1e-1
        assert r["sync/canary_max_abs_diff"] < 1e-3 and r["sync/canary_mean_abs_diff"] < 1e-4
        assert r["sync/buckets"] >= 4  # embedding, the layers in 0.5 MiB buckets, final norm and head
        assert r["sync/bytes"] > 0 and r["perf/weight_sync_s"] >= r["perf/weight_load_s"] > 0
    formed = "weight sync over gloo: transfer group of 3 ranks" in stdout
    assert formed == (transport == "gloo")
    assert ("weight sync over ipc: shared buffers, no group" in stdout) == (transport == "ipc")
