"""The driver's side of speculative decoding with the online drafter (the ``drafter`` config section).

``DrafterController`` owns what the driver does for the drafter in a run:

- before the engines start: the drafter checkpoint they load (the latest checkpoint's drafter on a resume,
  ``drafter.init_path``, or a freshly initialized one written into the run directory) and their
  ``speculative_config`` (EAGLE, K = ``num_speculative_tokens``, the first batch-size schedule);
- once actors are up: the learner's ``drafter_setup`` (every rank holds a replica, fed from its share of the
  old-log-prob pass) and the schedule from ``SpecPolicy`` on every engine;
- around each generation phase: the engines' per-step statistics and acceptance counters, turned into metrics
  and fed to the bandit, which sets the next schedule;
- while the engines generate: drafter training on the learner (a Ray call that runs while the driver waits for
  rollouts), within the time budget; its overlap with generation is measured;
- after a weight sync, every ``publish_every`` steps: the drafter's weights pushed into the running engines.

It is a step hook (``trainers.hooks``): the loop calls it around each batch, after the update and after the push.
"""

from __future__ import annotations

import time
from pathlib import Path

from rl.config import DrafterSection
from trainers.hooks import StepHook
from trainers.kinds.base import StepBatch
from rollout.drafter.bandit import SpecTokensBanditConfig
from rollout.drafter.metrics import SpecDecodeCounters
from rollout.drafter.online import OnlineDrafterConfig
from rollout.drafter.policy import SpecPolicy, merge_rows, phase_metrics

INIT_DIR = "drafter_init"
MAX_BATCH_SIZE = 1024  # schedules cover running batch sizes 1..this (vLLM clips them to its max_num_seqs)


class DrafterController(StepHook):
    name = "spec_decode"

    def __init__(self, section: DrafterSection, run_dir: Path, model_path: str, seed: int,
                 resume_checkpoint: Path | None = None) -> None:
        if section.mode == "off":
            raise ValueError("DrafterController needs drafter.mode fixed or adaptive")
        self.cfg = section
        self.run_dir = Path(run_dir)
        self.model_path = model_path
        self.seed = seed
        self.drafter_dir = self._initial_drafter(resume_checkpoint)
        bandit = None
        if section.mode == "adaptive":
            bandit = SpecTokensBanditConfig(
                arms=tuple(section.arms), batch_size_bounds=tuple(section.batch_size_bounds), policy=section.bandit,
                epsilon=section.epsilon, ucb_c=section.ucb_c, step_size=section.bandit_step_size, seed=seed)
        self.policy = SpecPolicy(section.mode, section.num_speculative_tokens, section.long_tail_threshold, bandit,
                                 max_batch_size=MAX_BATCH_SIZE, min_seconds=section.min_bucket_seconds)
        self.engines: list = []
        self.learner = None
        self.last_generation_s: float | None = None
        self.submitted_budget_s = 0.0
        self.published_version = 0
        self.push_drafter = None
        """Set by the driver when the weights travel over a transfer group (``trainers.sync.push_drafter_transfer``);
        None: publish through the object store (``Engine.load_drafter_weights``)."""
        self.attach_metrics: dict[str, float] = {}
        # one training round per step, on the learner while the engines make the first batch after an update: its
        # refs, whether that batch's generation interval is still to come, the interval, the current phase's start
        self._training: list | None = None
        self._awaiting_interval = False
        self._interval: tuple[float, float] | None = None
        self._phase_start = 0.0

    # ------------------------------------------------------------------ start-up
    def _initial_drafter(self, resume_checkpoint: Path | None) -> str:
        from rollout.drafter.checkpoint import read_drafter_config

        if resume_checkpoint is not None and (resume_checkpoint / "drafter").is_dir():
            path = resume_checkpoint / "drafter"
        elif self.cfg.init_path is not None:
            path = Path(self.cfg.init_path)
            if not path.is_dir():
                raise FileNotFoundError(f"drafter.init_path={path} is not a directory (a drafter checkpoint: "
                                        "config.json + model.safetensors in vLLM's EAGLE format)")
        else:
            path = self.run_dir / INIT_DIR
            if not (path / "config.json").is_file():
                self._write_fresh(path)
        read_drafter_config(path)  # fails early, naming the file, on a directory that is not a drafter
        return str(path.resolve())

    def _write_fresh(self, path: Path) -> None:
        import torch
        from transformers import AutoConfig

        from rollout.drafter.checkpoint import save_drafter
        from rollout.drafter.model import Drafter, DrafterConfig

        cfg = DrafterConfig.from_target(AutoConfig.from_pretrained(self.model_path))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            drafter = Drafter(cfg)
        save_drafter(drafter, path)

    def speculative_config(self) -> dict:
        """The engines' ``speculative_config``: our EAGLE drafter, K, and a start-up schedule in which every K the
        policy can choose has a batch size (``SpecPolicy.startup_schedule``; ``attach`` sets the first real one)."""
        return {"method": "eagle", "model": self.drafter_dir,
                "num_speculative_tokens": self.cfg.num_speculative_tokens,
                "num_speculative_tokens_per_batch_size": [list(r) for r in self.policy.startup_schedule()]}

    def attach(self, engines: list, learner) -> dict[str, float]:
        """Engines and the learner group are up: the learner takes the drafter, the engines the schedule."""
        import ray

        self.engines, self.learner = engines, learner
        out = {}
        if self.cfg.train:
            config = OnlineDrafterConfig.from_section(self.cfg.model_dump())  # crosses Ray typed
            out["drafter/trainable_params"] = float(learner.call("drafter_setup", config, self.drafter_dir))
        ray.get([e.set_spec_schedule.remote(self.policy.next_schedule()) for e in engines])
        ray.get([e.spec_step_stats.remote() for e in engines])  # starts the step timers
        self.attach_metrics = out
        print(f"[rl] drafter: mode={self.cfg.mode} K={self.cfg.num_speculative_tokens} "
              f"long_tail_threshold={self.cfg.long_tail_threshold} train={self.cfg.train} "
              f"from {self.drafter_dir}", flush=True)
        return out

    # ------------------------------------------------------------------ around a generation phase
    def begin_generation(self) -> float:
        """Drop what the engines counted since the previous phase (evaluation, canary); returns the wall time."""
        import ray

        ray.get([e.spec_step_stats.remote() for e in self.engines]
                + [e.spec_decode_delta.remote() for e in self.engines])
        return time.time()

    def end_generation(self, started: float) -> tuple[dict[str, float], tuple[float, float]]:
        """The phase's speculative-decoding metrics and its wall-time interval; the bandit learns from the metrics
        and the next schedule goes to the engines."""
        import ray

        ended = time.time()
        self.last_generation_s = ended - started
        stats = ray.get([e.spec_step_stats.remote() for e in self.engines])
        deltas = ray.get([e.spec_decode_delta.remote() for e in self.engines])
        counters = SpecDecodeCounters()
        for d in deltas:
            counters = counters.plus(d)
        rows = merge_rows(stats)
        out = {**counters.as_metrics(), **phase_metrics(rows, self.cfg.long_tail_threshold, len(self.engines))}
        out.update(self.policy.observe(rows))
        schedule = self.policy.next_schedule()
        ray.get([e.set_spec_schedule.remote(schedule) for e in self.engines])
        return out, (started, ended)

    # ------------------------------------------------------------------ training and publishing
    def budget_s(self) -> float:
        budget = self.cfg.train_budget_s
        if self.cfg.budget_from_generation and self.last_generation_s is not None:
            budget = min(budget, self.last_generation_s)
        return budget

    def submit_training(self) -> list | None:
        """Start a training round on the learner (runs while the driver goes on); None when not training."""
        if not self.cfg.train:
            return None
        self.submitted_budget_s = self.budget_s()
        return self.learner.submit("drafter_train", self.submitted_budget_s, self.cfg.train_max_steps)

    def collect_training(self, refs: list | None, interval: tuple[float, float] | None) -> dict[str, float]:
        """The round's ``drafter/*`` metrics, with ``drafter/idle_overlap_s`` (its time inside the generation
        interval, when the learner would otherwise wait) and ``drafter/idle_overlap_frac``."""
        import ray

        if refs is None:
            return {}
        out = dict(ray.get(refs)[0])
        start, end = out.pop("drafter/train_start"), out.pop("drafter/train_end")
        if interval is not None:
            overlap = max(0.0, min(end, interval[1]) - max(start, interval[0]))
            out["drafter/idle_overlap_s"] = overlap
            out["drafter/idle_overlap_frac"] = overlap / (end - start) if end > start else 0.0
        out["drafter/budget_s"] = self.submitted_budget_s
        return out

    def publish(self, step: int) -> dict[str, float]:
        """Push the drafter's weights into the engines every ``publish_every`` steps (after the target's sync)."""
        import ray

        if not self.cfg.train or step % self.cfg.publish_every:
            return {}
        t0 = time.perf_counter()
        if self.push_drafter is not None:
            nbytes = self.push_drafter()["bytes"]
        else:
            blob = self.learner.call("export_drafter")
            nbytes = ray.get([e.load_drafter_weights.remote(blob) for e in self.engines])[0]["bytes"]
        self.published_version = step
        return {"perf/drafter_publish_s": time.perf_counter() - t0, "drafter/published_version": float(step),
                "drafter/publish_bytes": float(nbytes)}

    # ------------------------------------------------------------------ the step hook
    def start_metrics(self) -> dict[str, float]:
        return self.attach_metrics

    def before_collect(self, step: int) -> None:
        """The learner would wait for this batch: a training round goes first (queued behind the update in async
        mode), unless this step's round is already out."""
        if self._training is None:
            self._training = self.submit_training()
            self._awaiting_interval = True
        self._phase_start = self.begin_generation()

    def after_collect(self, step: int, batch: StepBatch) -> None:
        metrics, interval = self.end_generation(self._phase_start)
        batch.metrics.update(metrics)
        if self._awaiting_interval:
            self._interval, self._awaiting_interval = interval, False

    def after_update(self, step: int, metrics: dict[str, float]) -> None:
        metrics.update(self.collect_training(self._training, self._interval))
        self._training = self._interval = None

    def after_push(self, step: int, metrics: dict[str, float]) -> None:
        metrics.update(self.publish(step))

    def after_step(self, step: int, batch: StepBatch, metrics: dict[str, float]) -> None:
        if "rollout/spec/long_tail_s" in metrics:
            metrics["rollout/spec/long_tail_step_frac"] = metrics["rollout/spec/long_tail_s"] / metrics["perf/step_s"]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(),
                "published_version": self.published_version}

    def load_state_dict(self, state: dict | None, checkpoint: str = "") -> None:
        import ray

        if state is None:
            return
        if state.get("policy") is not None:
            self.policy.load_state_dict(state["policy"])
            if self.policy.current:
                ray.get([e.set_spec_schedule.remote(self.policy.current) for e in self.engines])
        self.published_version = int(state.get("published_version", 0))
