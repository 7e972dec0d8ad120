"""The run loop when something goes wrong mid-run, on a fake job (``fake_job``: the real loop, batch source,
checkpoints, metrics log and canary check over fake actors and a fake rollout kind; no Ray, no engines): Ctrl-C
mid-step, an engine or learner actor dying, a canary failure. A checkpoint labelled N must hold exactly N updates,
and ``--resume`` must continue from what was saved.

The fake learner counts its updates; its "weights" are that count, written into every checkpoint. A fake
engine serves the count it was last pushed. (With real Ray and vLLM: tests/integration/test_failures_train.py.)"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from ray.exceptions import ActorDiedError, RayActorError

from rl.config import load_config
from rl.data.datasets import PromptSampler
from rl.tracking import CheckpointManager, MetricsLogger, TrackerSettings
from rl.types import PromptItem, Rollout, TrainSample
from trainers import driver
from trainers.driver import ActorDiedError as RunActorDied, Trainer
from trainers.job import assemble
from trainers.kinds.base import RolloutContext, StepBatch
from trainers.sync import WeightSync, WeightSyncError


class Ref:
    """Stands in for a Ray object ref: ``ray.get`` (patched) returns its value or raises its error."""

    def __init__(self, value=None, error: Exception | None = None) -> None:
        self.value, self.error = value, error


def fake_get(refs, **_):
    if isinstance(refs, list):
        return [fake_get(r) for r in refs]
    if refs.error is not None:
        raise refs.error
    return refs.value


def _method(fn):
    """``actor.method.remote(...)`` for a plain function."""
    return SimpleNamespace(remote=fn)


def dead(actor_id: str, why: str) -> RayActorError:
    return RayActorError(actor_id=actor_id, error_msg=f"{ActorDiedError.BASE_ERROR_MSG}\n\tclass_name: X\n\t{why}")


class FakeLearner:
    """Rank 0 of a one-rank learner group. ``train_step`` is applied as soon as it is submitted (a real actor keeps
    applying it whatever the driver does meanwhile); ``on_update(step)`` runs right after."""

    def __init__(self) -> None:
        self.updates = 0
        self.dead_from_update: int | None = None  # the actor dies when this update is submitted
        self.disk_full_from_update: int | None = None  # a save fails half-written from this update on
        self.on_update = lambda n: None
        self.actors = [SimpleNamespace(_actor_id=SimpleNamespace(hex=lambda: "learner0"))]

    def _check_alive(self):
        if self.dead_from_update is not None and self.updates + 1 >= self.dead_from_update:
            raise dead("learner0", "Worker exit type: SYSTEM_ERROR Worker exit detail: killed by the OOM killer")

    def submit(self, method, *args):
        assert method == "train_step", method
        self._check_alive()
        self.updates += 1
        self.on_update(self.updates)
        return [Ref({"loss/policy": 0.0})]

    def call(self, method, *args):
        if method == "save":
            if self.dead_from_update is not None and self.updates + 1 >= self.dead_from_update:
                raise dead("learner0", "the actor is dead")
            (Path(args[0]) / "model").mkdir(parents=True, exist_ok=True)
            if self.disk_full_from_update is not None and self.updates >= self.disk_full_from_update:
                (Path(args[0]) / "model" / "model.safetensors").write_bytes(b"half")
                raise OSError(errno.ENOSPC, "No space left on device")
            (Path(args[0]) / "model" / "updates.json").write_text(json.dumps(self.updates))
            return None
        if method == "load":
            self.updates = json.loads((Path(args[0]) / "model" / "updates.json").read_text())
            return None
        if method == "probe_logprobs":
            return [[-1.0 - 0.1 * self.updates] * len(resp) for _, resp in args[0]]
        raise AssertionError(method)


class FakeEngine:
    def __init__(self, index: int) -> None:
        self.index = index
        self.serving = 0  # the learner update count it was last pushed
        self.stale_from_version: int | None = None  # from this version on, pushes do not reach the weights
        self.dead_at_step: int | None = None
        self.dead_at_push: int | None = None  # dies when the sync to this version starts (after the update)
        self._actor_id = SimpleNamespace(hex=lambda: f"engine{index}")
        self.score_tokens = _method(lambda probe: Ref([[-1.0 - 0.1 * self.serving] * len(r) for _, r in probe]))

    def generate(self, step: int) -> None:
        if self.dead_at_step is not None and step >= self.dead_at_step:
            raise dead(f"engine{self.index}", "Worker exit type: SYSTEM_ERROR Worker exit detail: the worker process "
                       "was killed by signal 9")


class FakeContext(RolloutContext):
    def generate(self, items, n, step, temperature, max_tokens, seed_offset=0):
        return [[Rollout(it.id, [1, 2], [3, 4], [-1.0, -1.0], "stop", 0)] for it in items]


class FakeKind:
    """Two prompts a step, one sample each; an engine may die while generating."""

    name = "fake"

    def collect(self, ctx, step):
        for e in ctx.engines:
            e.generate(step)
        items = ctx.sampler.next(2)
        samples = [TrainSample([1, 2], [3, 4], [-1.0, -1.0], 1.0, it.id) for it in items]
        return StepBatch(samples, {"rollout/tokens": 4.0, "perf/rollout_s": 1.0})

    def evaluate(self, ctx, step):
        return {"eval/accuracy": 0.5}


class FakeSync(WeightSync):
    """The real canary; the push as the transports report it (a dead engine in the sync, a push that never reaches
    a stale engine's weights)."""

    def push(self, version):
        for i, e in enumerate(self.engines):
            if e.dead_at_push is not None and version >= e.dead_at_push:  # as trainers.sync._wait_all reports it
                raise WeightSyncError(
                    f"weight sync to version {version} (start) broke off on engine {i}: ActorDiedError: ...",
                    f"weight sync to version {version} (start)",
                    actor_error=dead(f"engine{i}", "Worker exit type: SYSTEM_ERROR Worker exit detail: EOF"))
        for e in self.engines:
            if e.stale_from_version is None or version < e.stale_from_version:
                e.serving = self.learner.updates
        self.version = version
        return {}


def fake_job(cfg, resume: bool = False, learner: FakeLearner | None = None, engines=None):
    """The real job (batch source, checkpoints, metrics log, reward guard) over fake actors and a fake kind."""
    run_dir = Path(cfg.run.output_dir)
    learner = learner or FakeLearner()
    engines = engines or [FakeEngine(0), FakeEngine(1)]
    pool = SimpleNamespace(names=[], take_first_errors=dict, metrics=lambda reset=False: {}, close=lambda: None)
    ctx = FakeContext(cfg, engines=engines, reward_pool=pool, learner=learner,
                      sampler=PromptSampler([PromptItem(f"p{i}", f"train {i}", "1") for i in range(6)], seed=0),
                      eval_items=[PromptItem(f"e{i}", f"eval {i}", "1") for i in range(2)])
    job = assemble(cfg, run_dir, logger=MetricsLogger(run_dir, TrackerSettings(trackers=("jsonl",))),
                   learner=learner, engines=engines, ctx=ctx, kind=FakeKind(), hooks=[], model_path=str(run_dir),
                   sync=FakeSync(cfg, learner, engines))
    if resume:
        job.load_latest()
    return job


class FakeTrainer(Trainer):
    """The real loop over a fake job."""

    def __init__(self, cfg, resume: bool = False, learner: FakeLearner | None = None, engines=None) -> None:
        super().__init__(fake_job(cfg, resume, learner, engines))
        self.fake_learner = self.job.learner


@pytest.fixture(autouse=True)
def _fake_ray(monkeypatch):
    monkeypatch.setattr(ray, "get", fake_get)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def config(run_dir, *overrides):
    return load_config(None, [f"run.output_dir={run_dir}", "run.progress=false", "run.trackers=[jsonl]",
                              "run.num_steps=6", "run.save_every_steps=2", "run.keep_last_checkpoints=10",
                              *overrides])


def checkpoints(run_dir) -> dict[int, int]:
    """step label -> learner updates inside, of every complete checkpoint."""
    return {int(p.name.split("_")[1]): json.loads((p / "model" / "updates.json").read_text())
            for p in CheckpointManager(run_dir, 10).list()}


def logged_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_while_the_learner_updates_finishes_the_step_and_saves_it(tmp_path, capsys):
    learner = FakeLearner()
    learner.on_update = lambda n: os.kill(os.getpid(), signal.SIGINT) if n == 3 else None
    with pytest.raises(KeyboardInterrupt):
        FakeTrainer(config(tmp_path), learner=learner).run()
    assert learner.updates == 3
    assert checkpoints(tmp_path) == {2: 2, 3: 3}  # every label holds exactly its updates
    assert logged_steps(tmp_path) == [0, 1, 2, 3]
    out = capsys.readouterr().out
    assert "Ctrl-C: stopping after this step" in out and "interrupted: saved step 3 to" in out
    # --resume continues from step 3 to the end
    resumed = FakeTrainer(config(tmp_path), resume=True)
    assert resumed.run()["final_step"] == 6 and resumed.fake_learner.updates == 6
    assert logged_steps(tmp_path) == [0, 1, 2, 3, 4, 5, 6]


def test_a_second_ctrl_c_mid_update_saves_nothing_under_the_wrong_label(tmp_path, capsys):
    learner = FakeLearner()

    def twice(n: int) -> None:
        if n == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    learner.on_update = twice
    with pytest.raises(KeyboardInterrupt):
        FakeTrainer(config(tmp_path), learner=learner).run()
    # The learner holds 3 updates, the driver finished step 2: no checkpoint labelled 2 may hold 3.
    assert checkpoints(tmp_path) == {2: 2}
    assert logged_steps(tmp_path) == [0, 1, 2]
    out = capsys.readouterr().out
    assert (f"interrupted: step 3's update had started, so the learner no longer holds step 2; the last checkpoint "
            f"is {tmp_path / 'checkpoints' / 'step_000002'}; continue with --resume") in out


def test_an_engine_dying_mid_run_saves_the_last_step_names_it_and_resume_continues(tmp_path):
    engines = [FakeEngine(0), FakeEngine(1)]
    engines[1].dead_at_step = 4
    with pytest.raises(RunActorDied) as info:
        FakeTrainer(config(tmp_path, "run.save_every_steps=0"), engines=engines).run()
    msg = str(info.value)
    assert msg.startswith("engine 1 died during step 4: Worker exit type: SYSTEM_ERROR Worker exit detail: the "
                          "worker process was killed by signal 9\nsaved step 3 to ")
    assert msg.endswith("continue with --resume.")
    assert checkpoints(tmp_path) == {3: 3} and logged_steps(tmp_path) == [0, 1, 2, 3]
    resumed = FakeTrainer(config(tmp_path, "run.save_every_steps=0"), resume=True)
    assert resumed.run()["final_step"] == 6 and resumed.fake_learner.updates == 6
    assert checkpoints(tmp_path) == {3: 3, 6: 6} and logged_steps(tmp_path) == [0, 1, 2, 3, 4, 5, 6]


def test_an_engine_dying_in_the_weight_sync_is_named_as_its_death(tmp_path):
    """Found dead by the sync after step 4's update: reported as engine 1's death during step 4 (with where), and the
    learner, already past step 3, saves nothing under that label; the regular checkpoint of step 3 stays."""
    engines = [FakeEngine(0), FakeEngine(1)]
    engines[1].dead_at_push = 4
    with pytest.raises(RunActorDied) as info:
        FakeTrainer(config(tmp_path, "run.save_every_steps=1"), engines=engines).run()
    assert str(info.value) == (
        "engine 1 died during step 4: Worker exit type: SYSTEM_ERROR Worker exit detail: EOF (in the weight sync to "
        "version 4 (start))\nstep 4's update had started, so the learner no longer holds step 3; the last checkpoint "
        f"is {tmp_path / 'checkpoints' / 'step_000003'}; continue with --resume.")
    assert checkpoints(tmp_path) == {1: 1, 2: 2, 3: 3} and logged_steps(tmp_path) == [0, 1, 2, 3]


def test_a_sync_error_without_a_dead_actor_is_not_reported_as_a_death(tmp_path):
    trainer = FakeTrainer(config(tmp_path))
    trainer.job.sync.push = lambda version: (_ for _ in ()).throw(WeightSyncError("broke off on engine 0: timeout"))
    with pytest.raises(WeightSyncError, match="timeout"):
        trainer.run()


def test_the_learner_dying_keeps_the_last_checkpoint_and_says_so(tmp_path):
    learner = FakeLearner()
    learner.dead_from_update = 4
    with pytest.raises(RunActorDied) as info:
        FakeTrainer(config(tmp_path), learner=learner).run()
    assert str(info.value) == (
        "learner rank 0 died during step 4: Worker exit type: SYSTEM_ERROR Worker exit detail: killed by the OOM "
        f"killer\nthe learner is gone, so nothing newer can be saved; the last checkpoint is "
        f"{tmp_path / 'checkpoints' / 'step_000002'}"
        "; continue with --resume.")
    assert checkpoints(tmp_path) == {2: 2}


def test_the_cli_exits_1_naming_the_dead_actor(tmp_path, monkeypatch, capsys):
    from trainers.cli import main

    def with_dead_engine(cfg, resume=False, allow_config_change=False):
        engines = [FakeEngine(0)]
        engines[0].dead_at_step = 2
        return fake_job(cfg, resume=resume, engines=engines)

    monkeypatch.setattr(driver, "start_job", with_dead_engine)
    assert main(["train", f"run.output_dir={tmp_path}", "run.progress=false", "run.trackers=[jsonl]",
                 "run.num_steps=3"]) == 1
    assert "rl train: engine 0 died during step 2: " in capsys.readouterr().err
    assert checkpoints(tmp_path) == {1: 1}


def test_a_canary_failure_stops_the_run_at_that_step(tmp_path, monkeypatch, capsys):
    from trainers.cli import main

    def with_stale_engine(cfg, resume=False, allow_config_change=False):
        engines = [FakeEngine(0), FakeEngine(1)]
        engines[1].stale_from_version = 3  # from the sync after step 3, engine 1 keeps step 2's weights
        return fake_job(cfg, resume=resume, engines=engines)

    monkeypatch.setattr(driver, "start_job", with_stale_engine)
    assert main(["train", f"run.output_dir={tmp_path}", "run.progress=false", "run.trackers=[jsonl]",
                 "run.num_steps=6", "run.save_every_steps=1", "run.keep_last_checkpoints=10"]) == 1
    err = capsys.readouterr().err
    # probe log-probs -1 - 0.1 * updates: engine 1 serves 2 updates, the learner holds 3 -> 0.1 on every token
    assert ("weight sync canary failed on engine 1 at version 3: engine and learner log-probs on the probe differ by "
            "0.1 on average (bound 0.0001) and 0.1 at most (bound 0.001;") in err
    assert logged_steps(tmp_path) == [0, 1, 2]  # nothing after the failed sync ran or was logged
    assert checkpoints(tmp_path) == {1: 1, 2: 2}


def test_a_full_disk_stops_the_run_removes_the_half_checkpoint_and_resume_continues(tmp_path, monkeypatch, capsys):
    from trainers.cli import main

    learner = FakeLearner()
    learner.disk_full_from_update = 4
    monkeypatch.setattr(driver, "start_job", lambda cfg, resume=False, allow_config_change=False:
                        fake_job(cfg, resume=resume, learner=learner))
    assert main(["train", f"run.output_dir={tmp_path}", "run.progress=false", "run.trackers=[jsonl]",
                 "run.num_steps=6", "run.save_every_steps=2", "run.keep_last_checkpoints=10"]) == 1
    err = capsys.readouterr().err
    root = tmp_path / "checkpoints"
    assert err.startswith(f"rl train: the checkpoint of step 4 could not be written to {root} (No space left on "
                          "device; ")
    assert err.rstrip().endswith(f"GiB free there); the half-written one was removed; the last complete checkpoint "
                                 f"is {root / 'step_000002'}: free some space, then continue with --resume.")
    assert checkpoints(tmp_path) == {2: 2}
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]  # no .tmp_step_000004 left holding the disk
    assert logged_steps(tmp_path) == [0, 1, 2, 3, 4]
    # space freed: --resume repeats steps 3 and 4 from the checkpoint of step 2 and runs to the end
    resumed = FakeTrainer(config(tmp_path), resume=True)
    assert resumed.run()["final_step"] == 6 and resumed.fake_learner.updates == 6
    assert checkpoints(tmp_path) == {2: 2, 4: 4, 6: 6} and logged_steps(tmp_path) == [0, 1, 2, 3, 4, 5, 6]


def test_a_full_disk_behind_a_ray_error_is_found_and_other_errors_pass_through():
    from ray.exceptions import RayTaskError

    from trainers.stops import os_error_of

    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RayTaskError("save", "Traceback ...", full).as_instanceof_cause()
    assert isinstance(wrapped, OSError) and os_error_of(wrapped) is full
    assert os_error_of(RuntimeError("no")) is None
