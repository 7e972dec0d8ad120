"""Config sections on where the run's processes go and how they talk: the weight sync, placement on the cluster,
Ray, async mode and the speculative drafter (``rl.config.Config`` composes them)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from rl.schema import ConfigSection as _Section


class SyncConfig(_Section):
    canary: bool = Field(True, description="After each weight sync, compare engine and learner log-probs on a probe.")
    canary_mean_abs_diff: float | None = Field(
        None, gt=0,
        description="Largest mean absolute log-prob difference (engine vs learner, over the probe's tokens) the "
        "canary allows; None: the default for the run's least precise compute dtype (CANARY_BOUNDS).",
    )
    canary_max_abs_diff: float | None = Field(
        None, gt=0,
        description="Largest absolute log-prob difference at any probe token the canary allows; None: the default "
        "for the run's least precise compute dtype (CANARY_BOUNDS).",
    )
    bucket_mb: float = Field(
        512.0, ge=0,
        description="Weight sync in buckets of about this many MiB, cut between decoder layers: the learner gathers "
        "bucket b+1 while the engines load bucket b, and no process holds more than two buckets in flight "
        "(0: the whole model in one piece).",
    )
    transport: Literal["auto", "object_store", "ipc", "nccl", "gloo"] = Field(
        "auto",
        description="How the buckets travel from the learner to the engines. object_store: safetensors bytes through "
        "the Ray object store into each engine's collective_rpc (works everywhere; the slowest). The others use vLLM's "
        "weight-transfer API with the project's engines (rollout.weight_transfer), one control flow: gloo: learner "
        "rank 0 broadcasts each bucket to every engine worker over a gloo group (CPU; any placement). nccl: the same "
        "over NCCL (learner and engines on GPUs, placement.mode=disaggregated). ipc: the learner packs each bucket "
        "into shared memory (CUDA IPC on a GPU, a shared-memory file on CPU) that the engine maps "
        "(placement.mode=colocated with one learner rank). auto: ipc when colocated with one learner rank; else nccl "
        "when learner and engines are on GPUs and disaggregated; else gloo on CPU engines; else object_store.",
    )
    transport_timeout_s: float = Field(
        300.0, gt=0,
        description="gloo transport: the longest the rendezvous or one bucket's broadcast may take; a transport that "
        "breaks mid-sync (a dead engine, a sender that stopped) fails the step after this, naming the engine and the "
        "bucket. (NCCL has no receive timeout; ipc has nothing to wait for.)",
    )

    def resolved_transport(self, engines_on_gpu: bool, learner_on_gpu: bool, colocated: bool,
                           learner_ranks: int) -> str:
        """The transport a run uses: ``transport``, with ``auto`` resolved for where the engines and the learner
        run (see the field's description)."""
        if self.transport != "auto":
            return self.transport
        if colocated and learner_ranks == 1:
            return "ipc"
        if engines_on_gpu and learner_on_gpu and not colocated:
            return "nccl"
        return "object_store" if engines_on_gpu else "gloo"

    def canary_bounds(self, dtype: str) -> tuple[float, float]:
        """(mean bound, max bound) of the canary for engines and learner computing in ``dtype``: the configured
        values, else ``CANARY_BOUNDS[dtype]``."""
        mean, largest = CANARY_BOUNDS[dtype]
        return (self.canary_mean_abs_diff or mean, self.canary_max_abs_diff or largest)



CANARY_BOUNDS: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-3),
    "bfloat16": (0.05, 0.5),
    "float16": (0.02, 0.25),
}
"""Default canary bounds per compute dtype: (mean, max) absolute log-prob difference between an engine that
serves the learner's weights and the learner. In float32 the two agree to ~1e-6. In bfloat16 each side rounds its
activations to 8 bits of mantissa in different kernels (fused norms and attention in the engine, another attention
and an fp32 LM head in the learner), so single tokens differ by several 1e-2; docs/architecture.md has the measured
gaps and what the bounds still catch."""


class PlacementConfig(_Section):
    """Where engines and learner ranks run (docs/cluster.md)."""

    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="`disaggregated`: engines and learner ranks on separate resources (their own placement-group "
        "bundles). `colocated`: engine i shares bundle i with learner rank i (needs rollout.num_engines == "
        "learner.num_ranks); on GPUs the engines sleep while the learner trains.",
    )
    engine_sleep_level: Literal[0, 1, 2] = Field(
        2,
        description="Colocated on GPUs: vLLM sleep level while the learner trains (1: offload weights and drop the KV "
        "cache; 2: drop both, the weights come back by the sync; 0: do not sleep). vLLM's CPU build has no sleep "
        "mode, so on CPU it is not applied (logged).",
    )
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the bundles.",
    )
    ready_timeout_s: float = Field(
        600.0, gt=0, description="How long to wait for Ray to reserve the bundles before failing with what is missing.",
    )
    learner_node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels a node must carry to host learner ranks, e.g. {rl-role: learner} for nodes "
        "started with `ray start --labels rl-role=learner` (a Ray label selector on every learner bundle; a value "
        "may also be `!v`, `in(a,b)` or `!in(a,b)`). Empty: any node. Needs ray.address (a local Ray is one node "
        "without labels). Colocated bundles hold an engine too and carry both label sets.",
    )
    engine_node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels a node must carry to host engines, e.g. {rl-role: rollout}; as "
        "learner_node_labels, for the engine bundles. Colocated: a key set in both must have the same value.",
    )

    @model_validator(mode="after")
    def _check_labels(self) -> "PlacementConfig":
        for name in ("learner_node_labels", "engine_node_labels"):
            for key, value in getattr(self, name).items():
                problem = _label_selector_problem(key, value)
                if problem:
                    raise ValueError(f"placement.{name}: {problem}")
        if self.mode == "colocated":
            clash = {k for k in self.learner_node_labels.keys() & self.engine_node_labels.keys()
                     if self.learner_node_labels[k] != self.engine_node_labels[k]}
            if clash:
                k = sorted(clash)[0]
                raise ValueError(
                    f"placement.mode=colocated puts engine i and learner rank i in one bundle on one node, but "
                    f"placement.learner_node_labels[{k!r}]={self.learner_node_labels[k]!r} and "
                    f"placement.engine_node_labels[{k!r}]={self.engine_node_labels[k]!r}: no node can satisfy both; "
                    "give the key one value or use placement.mode=disaggregated")
        return self


def _label_selector_problem(key: str, value: str) -> str | None:
    """Why ``key: value`` is not a Ray node-label selector (None when it is): the key is a label name of at most 63
    characters, optionally behind a DNS-style prefix and ``/``; the value is a label value, optionally negated
    (``!v``), or a set ``in(a,b)`` / ``!in(a,b)``."""

    name = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
    prefix, _, base = key.rpartition("/")
    if not re.fullmatch(name, base) or (prefix and (len(prefix) > 253 or not re.fullmatch(
            r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*", prefix))):
        return (f"label key {key!r} is not a node-label name (letters, digits, '-', '_', '.', at most 63 "
                "characters, alphanumeric at both ends, optionally behind a DNS prefix and '/')")
    body = value[1:] if value.startswith("!") else value
    items = re.fullmatch(r"in\((.*)\)", body)
    values = [v.strip() for v in items.group(1).split(",")] if items else [body]
    if not values or not all(re.fullmatch(name, v) for v in values):
        return (f"label value {value!r} of {key!r} is not a selector: give a value (letters, digits, '-', '_', "
                "'.', at most 63 characters), optionally as !value, in(a,b) or !in(a,b)")
    return None


class AsyncConfig(_Section):
    """Overlap of generation and training (docs/architecture.md, "Async mode")."""

    enabled: bool = Field(
        False, description="Generate step t+1's rollouts while the learner trains on step t's.",
    )
    max_off_policy_steps: int = Field(
        1, ge=0,
        description="Most policy versions a rollout may lag the policy it trains (0: wait for the sync before "
        "generating, i.e. sync mode).",
    )
    tis_cap: float = Field(
        2.0, gt=0,
        description="Truncated importance sampling: per-token weight min(pi_old / pi_behaviour, tis_cap) on the policy "
        "loss, where pi_old is the learner's recomputed policy and pi_behaviour the engine's (the stale one).",
    )


class DrafterSection(_Section):
    """Speculative decoding with an EAGLE drafter trained online on the policy's hidden states (docs/drafter.md)."""

    mode: Literal["off", "fixed", "adaptive"] = Field(
        "off",
        description="`off`: no speculative decoding. `fixed`: draft num_speculative_tokens tokens at running batch "
        "sizes up to long_tail_threshold, none above. `adaptive`: up to the threshold a bandit picks K per "
        "batch-size bucket from `arms` (0 = no drafting), rewarded with the engines' measured tokens/s; none above.",
    )
    num_speculative_tokens: int = Field(
        3, ge=1, description="The engines' K: fixed mode's K and the most any adaptive arm may draft.",
    )
    long_tail_threshold: int | None = Field(
        16, ge=1,
        description="Running batch size at or below which the engines may speculate (the long tail of a rollout "
        "phase); None: every batch size. In adaptive mode it must be one of batch_size_bounds.",
    )
    arms: list[int] = Field(
        [0, 1, 2, 3], description="Adaptive mode: the numbers of speculative tokens the bandit chooses from.",
    )
    batch_size_bounds: list[int] = Field(
        [1, 2, 4, 8, 16, 32, 64, 128, 256],
        description="Adaptive mode: inclusive upper bounds of the bandit's batch-size buckets.",
    )
    bandit: Literal["ucb1", "epsilon_greedy"] = Field("ucb1", description="Adaptive mode: the bandit policy.")
    epsilon: float = Field(0.1, ge=0, le=1, description="epsilon_greedy: exploration probability.")
    ucb_c: float = Field(1.0, ge=0, description="ucb1: exploration weight.")
    bandit_step_size: float | None = Field(
        0.3, gt=0, le=1,
        description="Recency weight of new rewards (the policy, and so acceptance, drifts); None: plain means.",
    )
    min_bucket_seconds: float = Field(
        0.05, ge=0, description="A bucket's decode time in one generation below this is not fed to the bandit "
        "(too noisy).",
    )
    init_path: str | None = Field(
        None, description="A drafter checkpoint (vLLM's EAGLE format, e.g. a run's checkpoints/step_N/drafter) to "
        "start from; None: a freshly initialized drafter.",
    )
    train: bool = Field(True, description="Train the drafter online (off: serve init_path as it is).")
    train_budget_s: float = Field(
        10.0, ge=0, description="Most seconds of drafter training per RL step.",
    )
    train_max_steps: int | None = Field(None, ge=1, description="Most drafter optimizer steps per RL step.")
    budget_from_generation: bool = Field(
        True, description="Cap each step's training time at the previous step's generation time, so that it fits "
        "in the learner's wait for rollouts.",
    )
    publish_every: int = Field(
        1, ge=1, description="Push the drafter's weights to the engines with the target weights every N steps.",
    )
    buffer_steps: int = Field(4, ge=1, description="RL steps of hidden states kept for training (most recent).")
    buffer_tokens: int = Field(
        200_000, ge=1, description="Most tokens kept in the buffer (all learner ranks together: each keeps its share).")
    buffer_dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="Storage dtype of hidden states.")
    batch_size: int = Field(
        16, ge=1, description="Sequences per drafter training step (all learner ranks together: each takes its share).")
    lr: float = Field(1e-3, gt=0, description="Drafter AdamW learning rate.")
    feature_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state regression (EAGLE: 1.0).")
    token_weight: float = Field(0.1, ge=0, description="Weight of the token cross-entropy (EAGLE: 0.1).")
    hidden_noise: float = Field(0.0, ge=0, description="Uniform noise half-width on input hidden states in training.")
    grad_clip: float = Field(0.5, description="Drafter gradient-norm clip (<= 0: none).")

    @model_validator(mode="after")
    def _check(self) -> "DrafterSection":
        if self.mode == "adaptive":
            if not self.arms or len(set(self.arms)) != len(self.arms) or min(self.arms) < 0:
                raise ValueError(f"drafter.arms must be distinct non-negative token counts, got {self.arms}")
            b = self.batch_size_bounds
            if not b or b[0] < 1 or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"drafter.batch_size_bounds must be increasing positive integers, got {b}")
            if max(self.arms) > self.num_speculative_tokens:
                raise ValueError(f"drafter.arms {self.arms} exceed drafter.num_speculative_tokens="
                                 f"{self.num_speculative_tokens}, the most the engines draft; raise it or drop arms")
            if self.long_tail_threshold is not None and self.long_tail_threshold not in self.batch_size_bounds:
                raise ValueError(f"drafter.long_tail_threshold={self.long_tail_threshold} must be one of "
                                 f"drafter.batch_size_bounds {self.batch_size_bounds}, so no bucket straddles it")
        if self.mode != "off" and not self.train and self.init_path is None:
            raise ValueError("drafter.train=false serves drafter.init_path as it is: set init_path (an untrained "
                             "drafter only costs time)")
        return self


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address (None: start a local Ray).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (None: enough for the actors).")
