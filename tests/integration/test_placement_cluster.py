"""The run's placement on a simulated two-node Ray cluster with fake GPUs (``ray.cluster_utils.Cluster``).

Stand-in actors take exactly the ``.options(...)`` the driver gives its Engine and Learner actors
(``trainers.engine_actor_options`` / ``learner_actor_options`` over ``rl.placement.reserve``) and report where
they landed: node, GPU ids, ``CUDA_VISIBLE_DEVICES``, whether they run inside a placement group, and the
allocator setting they see. No vLLM, no learner.

Nodes: the head ``rl-role=learner`` and a worker ``rl-role=rollout``, 4 fake GPUs and 8 CPUs each. Both were
started with ``PYTORCH_CUDA_ALLOC_CONF`` in their environment, as a local Ray's nodes inherit the driver's.
"""

from __future__ import annotations

import os
import time

import pytest
import ray

from rl import placement
from rl.config import load_config
from trainers.actors import engine_actor_options, learner_actor_options

pytestmark = pytest.mark.integration

ALLOC = "expandable_segments:True"
GPUS_PER_NODE = 4


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTORCH_CUDA_ALLOC_CONF", ALLOC)  # inherited by the nodes, as with a local Ray
        c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=8, num_gpus=GPUS_PER_NODE,
                                                                labels={"rl-role": "learner"}))
        c.add_node(num_cpus=8, num_gpus=GPUS_PER_NODE, labels={"rl-role": "rollout"})
        try:
            ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
            c.wait_for_nodes()
            nodes = {n["Labels"]["rl-role"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert len(nodes) == 2
            yield nodes
        finally:
            ray.shutdown()
            c.shutdown()


@ray.remote(num_cpus=0)
class StandIn:
    """Stands where an Engine or a Learner actor would stand and says where that is."""

    def where(self) -> dict:
        from ray.util import get_current_placement_group

        return {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "in_pg": get_current_placement_group() is not None,
                "alloc": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


def _cfg(*overrides):
    return load_config("configs/tiny_cpu.yaml", [
        "model.build_tiny=true", "ray.address=auto", "learner.strategy=fsdp2", "learner.num_gpus=1",
        "rollout.num_gpus_per_engine=1", "learner.num_cpus=1", "rollout.num_cpus_per_engine=1",
        "placement.ready_timeout_s=30", *overrides])


def _all_gpus_free(timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("GPU", 0) < 2 * GPUS_PER_NODE:
        assert time.monotonic() < deadline, f"GPUs not given back: {ray.available_resources()}"
        time.sleep(0.2)


def _place(cfg):
    """Reserve as the driver does, start a stand-in per engine and per learner rank with the driver's options, and
    return (engines' reports, learners' reports)."""
    _all_gpus_free()
    placed = placement.reserve(cfg)
    actors = []
    try:
        engines = [StandIn.options(**engine_actor_options(cfg, placed, i)).remote()
                   for i in range(cfg.rollout.num_engines)]
        learners = [StandIn.options(**learner_actor_options(cfg, placed, k)).remote()
                    for k in range(cfg.learner.num_ranks)]
        actors = engines + learners
        reports = ray.get([a.where.remote() for a in actors], timeout=60)
    finally:
        for a in actors:
            ray.kill(a)
        placement.release(placed)
    return reports[:len(engines)], reports[len(engines):]


def _check_own_gpu(report: dict) -> None:
    assert len(report["gpus"]) == 1 and report["cvd"] == report["gpus"][0], report
    assert report["in_pg"], report


def _check_pairs(engines, learners) -> None:
    """Colocated: engine i and learner rank i on one node and one GPU; different pairs never share a GPU."""
    assert len(engines) == len(learners)
    for e, l in zip(engines, learners):
        _check_own_gpu(e)
        _check_own_gpu(l)
        assert (e["node"], e["gpus"]) == (l["node"], l["gpus"]), (e, l)
    devices = {(e["node"], e["gpus"][0]) for e in engines}
    assert len(devices) == len(engines), engines


def test_colocated_pack_puts_every_pair_on_one_node_and_one_gpu(cluster):
    engines, learners = _place(_cfg("placement.mode=colocated", "learner.num_ranks=4", "rollout.num_engines=4"))
    _check_pairs(engines, learners)
    assert len({r["node"] for r in engines + learners}) == 1  # PACK: 4 bundles fit one node
    # the learner-only allocator setting reaches the learners; the engines see it blanked
    assert {r["alloc"] for r in learners} == {ALLOC} and {r["alloc"] for r in engines} == {""}


def test_colocated_spread_puts_pairs_on_both_nodes(cluster):
    engines, learners = _place(_cfg("placement.mode=colocated", "placement.strategy=SPREAD", "learner.num_ranks=2",
                                    "rollout.num_engines=2"))
    _check_pairs(engines, learners)
    assert {e["node"] for e in engines} == set(cluster.values())


def test_colocated_pairs_follow_the_node_labels(cluster):
    # once onto each node: wherever PACK would go unlabelled, one of the two differs from it
    for role, pairs in (("rollout", 2), ("learner", 1)):
        engines, learners = _place(_cfg("placement.mode=colocated", f"learner.num_ranks={pairs}",
                                        f"rollout.num_engines={pairs}", f"placement.engine_node_labels={{rl-role: {role}}}"))
        _check_pairs(engines, learners)
        assert {r["node"] for r in engines + learners} == {cluster[role]}


def test_disaggregated_learners_and_engines_on_their_labelled_nodes(cluster):
    # Without labels both groups would fit on one node; the labels split them.
    engines, learners = _place(_cfg("learner.num_ranks=3", "rollout.num_engines=2",
                                    "placement.learner_node_labels={rl-role: learner}",
                                    "placement.engine_node_labels={rl-role: rollout}"))
    for r in engines + learners:
        _check_own_gpu(r)
    assert [r["node"] for r in learners] == [cluster["learner"]] * 3
    assert [r["node"] for r in engines] == [cluster["rollout"]] * 2
    assert len({r["gpus"][0] for r in learners}) == 3 and len({r["gpus"][0] for r in engines}) == 2
    assert {r["alloc"] for r in learners} == {ALLOC} and {r["alloc"] for r in engines} == {""}


def test_could_not_reserve_names_the_request_and_the_nodes_in_bounded_time(cluster):
    # 5 learner GPUs on the one learner-labelled node of 4 GPUs: never possible. The engine group is.
    cfg = _cfg("learner.num_ranks=5", "rollout.num_engines=2", "placement.ready_timeout_s=2",
               "placement.learner_node_labels={rl-role: learner}")
    _all_gpus_free()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        placement.reserve(cfg)
    elapsed = time.monotonic() - t0
    assert elapsed < 2 + 8, elapsed  # the timeout plus describing the cluster, not Ray's own retries
    msg = str(err.value)
    assert "placement.ready_timeout_s=2" in msg
    assert "learner group: 5 x {CPU: 1, GPU: 1} (PACK, nodes labelled rl-role=learner)" in msg
    assert "engine group: 2 x {CPU: 1, GPU: 1} (PACK)" in msg
    assert "not reserved: learner." in msg
    assert "2 node(s)" in msg
    for role, node in cluster.items():
        assert f"node {node[:8]} {{CPU: 8, GPU: {GPUS_PER_NODE}}} labels rl-role={role}" in msg
    _all_gpus_free()  # the engine group that was reserved is given back too
    from ray.util import placement_group_table

    assert {g["state"] for g in placement_group_table().values()} <= {"REMOVED"}
