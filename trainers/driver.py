"""The training loop: one RL step after another, as in DESIGN.md's data flow.

    the step's batch (the rollout kind: generate, grade, advantages) -> learner update -> weight sync + canary
    -> log, evaluate, checkpoint

What a step's batch is comes from the rollout kind (``trainers.kinds``); what features add to a step comes from the
step hooks (``trainers.hooks``); where the batch comes from (now, or made during the previous update) from the
batch source (``trainers.batch_source``); the engines' turn while the learner trains from the job's ``turn``
(``trainers.learner_turn``); the set-up and checkpoints from the job (``trainers.job``).
"""

from __future__ import annotations

import json
import signal
import time

import ray
from ray.exceptions import RayActorError

from rl.config import Config
from rl.tracking import Progress
from trainers.job import Job, start_job
from trainers.reward_guard import RewardError
from trainers.stops import ActorDiedError, CheckpointWriteError, dead_actor, save_after_failure
from trainers.sync import CanaryError, WeightSyncError

__all__ = ["ActorDiedError", "CanaryError", "CheckpointWriteError", "RewardError", "Trainer", "WeightSyncError", "train"]


class Trainer:
    """Runs a set-up ``Job``: ``run()`` trains from its start step to ``run.num_steps``."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.stop_requested = False
        # the step whose update the learner holds (or is applying): a checkpoint labelled with any other step
        # would hold another step's weights
        self.learner_step = job.start_step

    def run(self) -> dict:
        job, cfg = self.job, self.job.cfg
        # the canary's fixed probe: the answers to the first two eval prompts, fixed for the whole run
        job.sync.set_probe(job.ctx.generate(job.ctx.eval_items[:2], 1, step=0, temperature=1.0, max_tokens=16))
        first = job.sync.sync_weights(version=job.start_step)
        summary: dict = {"run_dir": str(job.run_dir)}
        progress = Progress(cfg.run.num_steps, job.start_step, cfg.run.progress)
        step = job.start_step
        old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in old_handlers:
            signal.signal(sig, self.on_stop_signal)
        try:
            if job.start_step == 0:
                ev = job.evaluate(0)
                job.logger.log(0, {**ev, **first, **{k: v for h in job.hooks for k, v in h.start_metrics().items()}})
                progress.message(f"[rl] step 0: held-out accuracy {ev['eval/accuracy']:.3f}")
                summary["eval_before"] = ev["eval/accuracy"]
            while step < cfg.run.num_steps:
                if self.stop_requested:
                    raise KeyboardInterrupt
                metrics = self.train_one_step(step + 1)
                step += 1
                if job.eval_due(step):
                    metrics.update(job.evaluate(step))
                if step == cfg.run.num_steps:
                    summary["eval_after"] = metrics["eval/accuracy"]
                job.logger.log(step, metrics)
                progress.update(step, metrics)
                if job.save_due(step):
                    job.save_checkpoint(step)
        except KeyboardInterrupt:
            progress.close()
            print(f"\n[rl] interrupted: {save_after_failure(job, step, self.learner_step)}; continue with --resume",
                  flush=True)
            raise
        except RewardError as exc:
            progress.close()
            raise RewardError(f"{exc}\n{save_after_failure(job, step, self.learner_step)}: fix the reward, then "
                              "continue with --resume.") from None
        except (RayActorError, WeightSyncError) as exc:
            progress.close()
            dead = exc.actor_error if isinstance(exc, WeightSyncError) else exc
            if dead is None:
                raise
            who, why = dead_actor(job, dead)
            where = f" (in the {exc.what})" if isinstance(exc, WeightSyncError) else ""
            saved = save_after_failure(job, step, self.learner_step, learner_died=who.startswith("learner"))
            raise ActorDiedError(f"{who} died during step {step + 1}: {why}{where}\n{saved}; continue with "
                                 "--resume.") from None
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            progress.close()
        summary["final_step"] = step
        (job.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def on_stop_signal(self, signum, frame) -> None:
        """SIGTERM or a first Ctrl-C: stop after the current step (its checkpoint then holds exactly its update). A
        second Ctrl-C stops at once."""
        if signum == signal.SIGINT:
            if self.stop_requested:
                raise KeyboardInterrupt
            print("\n[rl] Ctrl-C: stopping after this step (Ctrl-C again to stop now)", flush=True)
        self.stop_requested = True

    def train_one_step(self, step: int) -> dict[str, float]:
        """The step's batch -> learner update -> weight sync (when the batch source says it is due) -> canary."""
        job = self.job
        t_step = time.perf_counter()
        batch = job.source.take(step)
        metrics = batch.metrics
        job.reward_guard.check(step, metrics, before_stop=lambda: job.log_samples(step, batch))
        with job.turn(metrics) as wake_weights:
            t_learn = time.perf_counter()
            if batch.samples:
                self.learner_step = step
                refs = job.learner.submit("train_step", batch.samples)
            else:
                refs = None
                print(f"[rl] step {step}: the batch has no samples (every group was filtered out); no update this step",
                      flush=True)
            job.source.overlap(step, metrics)  # e.g. the next batch, while the learner trains
            if refs is not None:
                metrics.update(ray.get(refs)[0])
            for hook in job.hooks:
                hook.after_update(step, metrics)
            metrics["perf/learner_wall_s"] = time.perf_counter() - t_learn
            wake_weights()
            synced = job.source.sync_due(step, job.eval_due(step))
            t_sync, sync_wait = time.perf_counter(), 0.0
            if synced:
                metrics.update(job.sync.push(version=step))
                for hook in job.hooks:
                    hook.after_push(step, metrics)
                sync_wait = time.perf_counter() - t_sync
        if synced:
            t_sync = time.perf_counter()
            metrics.update(job.sync.canary(version=step))
            sync_wait += time.perf_counter() - t_sync
        # what the step waited for its sync (nothing overlaps it); 0 for a step whose sync the source skipped
        metrics["perf/sync_wait_s"] = sync_wait
        job.source.finish(step, batch, metrics)
        n_tokens = metrics.pop("rollout/tokens")
        metrics.update({"perf/rollout_tokens_per_s": n_tokens / max(metrics["perf/rollout_s"], 1e-9),
                        "perf/step_s": time.perf_counter() - t_step})
        for hook in job.hooks:
            hook.after_step(step, batch, metrics)
        job.log_samples(step, batch)
        return metrics


def train(cfg: Config, resume: bool = False, allow_config_change: bool = False) -> dict:
    job = start_job(cfg, resume=resume, allow_config_change=allow_config_change)
    try:
        return Trainer(job).run()
    finally:
        job.close()
