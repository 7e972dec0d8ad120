"""Where a run's actors go: the Ray placement groups the driver reserves and each actor's scheduling options.

Nothing here starts vLLM or a learner. The driver calls :func:`reserve`, then starts engine i with
:func:`engine_options` and learner rank k with :func:`learner_options`; a test can place stand-in actors with
exactly those options on a simulated cluster and look where they landed.

- ``disaggregated``: one placement group of ``learner.num_ranks`` learner bundles and one of
  ``rollout.num_engines`` engine bundles, each with ``placement.strategy``. Learner bundles carry
  ``placement.learner_node_labels`` as Ray label selectors, engine bundles ``placement.engine_node_labels``.
- ``colocated``: one group; bundle i holds engine i and learner rank i. On GPUs each of the two asks Ray for half
  of the bundle's GPU, so both see the same device. The bundles carry both label selectors (merged; the config
  rejects a key the two set differently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    """One bundle: its CPUs (never zero: Ray rejects an empty bundle) and its GPUs when it has any."""
    return {"CPU": max(float(cpus), 0.001), **({"GPU": float(gpus)} if gpus > 0 else {})}


@dataclass(frozen=True)
class GroupSpec:
    """What one placement group asks for."""

    name: str  # "learner", "engine" or "colocated"
    bundles: list[dict[str, float]]
    labels: dict[str, str]  # label selector of every bundle ({}: any node)
    strategy: str


def node_labels(cfg, role: str) -> dict[str, str]:
    """The label selector of the bundles that hold ``role`` ("learner", "engine" or "colocated": both merged)."""
    pc = cfg.placement
    if role == "learner":
        return dict(pc.learner_node_labels)
    if role == "engine":
        return dict(pc.engine_node_labels)
    return {**pc.engine_node_labels, **pc.learner_node_labels}


def group_specs(cfg) -> list[GroupSpec]:
    """The placement groups of a run: [colocated] or [learner, engine]."""
    lc, r, pc = cfg.learner, cfg.rollout, cfg.placement
    if pc.mode == "colocated":
        shared = bundle(lc.num_cpus + r.num_cpus_per_engine, max(lc.num_gpus, r.num_gpus_per_engine))
        return [GroupSpec("colocated", [dict(shared) for _ in range(lc.num_ranks)], node_labels(cfg, "colocated"),
                          pc.strategy)]
    return [GroupSpec("learner", [bundle(lc.num_cpus, lc.num_gpus) for _ in range(lc.num_ranks)],
                      node_labels(cfg, "learner"), pc.strategy),
            GroupSpec("engine", [bundle(r.num_cpus_per_engine, r.num_gpus_per_engine) for _ in range(r.num_engines)],
                      node_labels(cfg, "engine"), pc.strategy)]


@dataclass(frozen=True)
class Placement:
    """The reserved groups. Colocated: ``learner_group is engine_group``, learner rank i and engine i in bundle i."""

    learner_group: Any
    engine_group: Any
    shared_gpu: bool  # colocated on GPUs: the pair splits bundle i's GPU, 0.5 each as far as Ray counts

    @property
    def groups(self) -> list:
        return [self.learner_group] if self.learner_group is self.engine_group else [self.learner_group,
                                                                                     self.engine_group]


def _short(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def describe_request(spec: GroupSpec) -> str:
    """``learner group: 2 x {CPU: 1, GPU: 1} (PACK, nodes labelled rl-role=learner)``: identical bundles counted."""
    parts, prev, count = [], None, 0
    for b in [*spec.bundles, None]:
        if b == prev:
            count += 1
            continue
        if prev is not None:
            parts.append(f"{count} x {_short(prev)}")
        prev, count = b, 1
    where = ", nodes labelled " + ",".join(f"{k}={v}" for k, v in spec.labels.items()) if spec.labels else ""
    return f"{spec.name} group: {' + '.join(parts)} ({spec.strategy}{where})"


_RESOURCE_NOISE = ("memory", "object_store_memory")


def describe_cluster() -> str:
    """The alive nodes of the connected Ray cluster: their resources (CPU, GPU, custom) and user labels, and what
    is free cluster-wide."""
    import ray

    lines = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = {k: v for k, v in sorted(n.get("Resources", {}).items())
               if k not in _RESOURCE_NOISE and not k.startswith("node:")}
        labels = {k: v for k, v in (n.get("Labels") or {}).items() if not k.startswith("ray.io/")}
        label_text = " labels " + ",".join(f"{k}={v}" for k, v in labels.items()) if labels else " no labels"
        lines.append(f"node {n['NodeID'][:8]} {_short(res)}{label_text}")
    free = {k: v for k, v in sorted(ray.available_resources().items())
            if k not in _RESOURCE_NOISE and not k.startswith("node:")}
    return f"{len(lines)} node(s): " + "; ".join(lines) + f"; free now: {_short(free)}"


def reserve(cfg) -> Placement:
    """Create the run's placement groups and wait up to ``placement.ready_timeout_s`` for Ray to reserve them. On
    a timeout, remove them (a pending group would take resources later) and raise a RuntimeError that names what
    was asked and what the cluster has."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pc = cfg.placement
    specs = group_specs(cfg)
    groups = []
    for s in specs:
        kwargs = {"bundle_label_selector": [dict(s.labels) for _ in s.bundles]} if s.labels else {}
        groups.append(placement_group(s.bundles, strategy=s.strategy, **kwargs))
    refs = [g.ready() for g in groups]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=pc.ready_timeout_s)
    if len(ready) < len(refs):
        missing = [s for s, ref in zip(specs, refs) if ref not in ready]
        try:
            cluster = describe_cluster()
        except Exception as e:  # the message must not be lost to a failure while describing the cluster
            cluster = f"(could not list the nodes: {e})"
        for g in groups:
            remove_placement_group(g)
        raise RuntimeError(
            f"placement ({pc.mode}) could not reserve within placement.ready_timeout_s={pc.ready_timeout_s:g}: "
            f"asked for {'; '.join(describe_request(s) for s in specs)}; not reserved: "
            f"{', '.join(s.name for s in missing)}. The cluster has {cluster}. Lower learner.num_ranks / "
            "rollout.num_engines or their num_cpus/num_gpus, relax placement.strategy or the node labels, or add "
            "nodes (`rl plan` checks the counts before a run)")
    lc, r = cfg.learner, cfg.rollout
    shared_gpu = pc.mode == "colocated" and lc.num_gpus > 0 and r.num_gpus_per_engine > 0
    return Placement(groups[0], groups[-1], shared_gpu)


def release(placement: Placement) -> None:
    """Give the reserved bundles back to the cluster."""
    from ray.util.placement_group import remove_placement_group

    for g in placement.groups:
        remove_placement_group(g)


def _in_bundle(group, index: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)


def _with_env(opts: dict, env_vars: dict[str, str] | None) -> dict:
    if env_vars:
        opts["runtime_env"] = {"env_vars": dict(env_vars)}
    return opts


def engine_options(cfg, placement: Placement, index: int, env_vars: dict[str, str] | None = None) -> dict:
    """``.options(...)`` of engine ``index``: its CPUs and GPUs, in bundle ``index`` of the engine group."""
    r = cfg.rollout
    return _with_env(dict(num_cpus=r.num_cpus_per_engine,
                          num_gpus=0.5 if placement.shared_gpu else r.num_gpus_per_engine,
                          scheduling_strategy=_in_bundle(placement.engine_group, index)), env_vars)


def learner_options(cfg, placement: Placement, rank: int, env_vars: dict[str, str] | None = None) -> dict:
    """``.options(...)`` of learner rank ``rank``: its CPUs and GPUs, in bundle ``rank`` of the learner group."""
    lc = cfg.learner
    return _with_env(dict(num_cpus=lc.num_cpus, num_gpus=0.5 if placement.shared_gpu else lc.num_gpus,
                          scheduling_strategy=_in_bundle(placement.learner_group, rank)), env_vars)


def rank0_options(placement: Placement) -> dict:
    """``.options(...)`` of a zero-resource task on learner rank 0's node (it picks the rendezvous address)."""
    return dict(num_cpus=0, scheduling_strategy=_in_bundle(placement.learner_group, 0))
