"""Run outputs: metrics (JSONL, TensorBoard, wandb, MLflow), rollout samples, a progress display, atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


_MLFLOW_KEY = re.compile(r"[^/\w.\- :]")  # MLflow accepts letters, digits, _ - . space : and / in names


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (booleans and strings are not plotted)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow parameters are flat)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class TrackerSettings:
    """Where metrics go besides metrics.jsonl (``run.trackers`` and the fields beside it)."""

    trackers: tuple[str, ...] = ("jsonl", "tensorboard")
    name: str = "run"
    project: str = "rl-reasoning"
    tags: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)  # the resolved config, logged once
    mlflow_tracking_uri: str | None = None
    verbose: bool = False  # the libraries' INFO logs (MLflow's database set-up, ...) on the console


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, settings: TrackerSettings, state: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, v, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class _Wandb:
    """A wandb run in ``<run_dir>/wandb``; its id is kept in trackers.json so that ``--resume`` continues it."""

    name = "wandb"

    def __init__(self, run_dir: Path, settings: TrackerSettings, state: dict) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = state.get("wandb_id") or uuid.uuid4().hex[:12]
        self._run = wandb.init(project=settings.project, name=settings.name, tags=list(settings.tags),
                               config=settings.config, dir=str(run_dir), id=run_id, resume="allow")
        state["wandb_id"] = run_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class _MLflow:
    """An MLflow run (experiment ``run.project``); its id is kept in trackers.json so that ``--resume`` continues
    it. The config goes in as flat parameters (``algorithm.clip_eps_low``, ...)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, settings: TrackerSettings, state: dict) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        if not settings.verbose:  # MLflow sets its logger to INFO when imported
            logging.getLogger("mlflow").setLevel(logging.WARNING)

        uri = (settings.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{run_dir / 'mlflow.db'}")
        self._client = MlflowClient(tracking_uri=uri)
        run_id = state.get("mlflow_run_id") if state.get("mlflow_tracking_uri") == uri else None
        if run_id is None:
            exp = self._client.get_experiment_by_name(settings.project)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(
                settings.project, artifact_location=(run_dir / "mlruns").as_uri())
            run = self._client.create_run(exp_id, run_name=settings.name, tags={t: "" for t in settings.tags})
            run_id = run.info.run_id
            params = {k: str(v)[:6000] for k, v in flatten(settings.config).items()}
            items = list(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
                self._client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        else:
            self._client.update_run(run_id, status="RUNNING")
        self._run_id = run_id
        state.update(mlflow_run_id=run_id, mlflow_tracking_uri=uri)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", k), v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(self._run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}
_HINTS = {
    "wandb": " Log in with `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to write the run under "
    "run.output_dir/wandb and upload it later with `wandb sync`.",
    "mlflow": " Check run.mlflow_tracking_uri / $MLFLOW_TRACKING_URI (a server must be reachable; a sqlite:/// URI "
    "needs SQLAlchemy and Alembic installed).",
}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def missing_tracker_packages(trackers) -> list[str]:
    """Trackers in the list whose package is not installed (checked before a run starts anything heavy)."""
    import importlib.util

    return [t for t in trackers if t in _PACKAGES and importlib.util.find_spec(_PACKAGES[t]) is None]


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors the scalars to each configured tracker
    (TensorBoard, wandb, MLflow). A tracker that fails to log is switched off with one warning: a dashboard's
    outage never stops training, and metrics.jsonl keeps everything."""

    def __init__(self, run_dir: Path, settings: TrackerSettings | None = None, resume: bool = False) -> None:
        settings = settings or TrackerSettings()
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self._state_path = run_dir / "trackers.json"
        state = json.loads(self._state_path.read_text()) if resume and self._state_path.exists() else {}
        self._trackers = []
        for name in settings.trackers:
            if name not in _TRACKERS:
                continue
            try:
                self._trackers.append(_TRACKERS[name](run_dir, settings, state))
            except Exception as e:  # noqa: BLE001 - a tracker that cannot start stops the run now, saying why
                self.close()
                raise ValueError(f"run.trackers: {name} could not start ({type(e).__name__}: {e}).{_HINTS.get(name, '')}"
                                 ) from e
        _atomic_write_text(self._state_path, json.dumps(state, indent=1))

    @property
    def tracker_names(self) -> list[str]:
        return ["jsonl"] + [t.name for t in self._trackers]

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        scalars = _scalars(metrics)
        for tracker in list(self._trackers):
            try:
                tracker.log(step, scalars)
            except Exception as e:  # noqa: BLE001 - any tracker failure: keep training, say so once
                print(f"[rl] warning: tracker {tracker.name} failed at step {step} ({type(e).__name__}: {e}); "
                      "it is off for the rest of the run (metrics.jsonl has every step)", file=sys.stderr, flush=True)
                self._trackers.remove(tracker)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        with self.samples_path.open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, so the files read as one clean run."""
        for path in (self.path, self.samples_path):
            if not path.exists():
                continue
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            _atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        for tracker in self._trackers:
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                print(f"[rl] warning: closing tracker {tracker.name}: {type(e).__name__}: {e}", file=sys.stderr)
        self._trackers = []


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    """``<run>/checkpoints/step_000010/``; written into a temp dir and renamed, so a crash never leaves a half
    checkpoint under a real name. ``latest`` is found by scanning complete directories."""

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.root = run_dir / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last

    def begin(self, step: int) -> Path:
        tmp = self.root / f".tmp_step_{step:06d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, driver_state: dict) -> Path:
        (tmp / "driver_state.json").write_text(json.dumps(driver_state, indent=1))
        final = self.root / f"step_{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.list()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def list(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if (p / "driver_state.json").exists())

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None


def _bar_and_info_class():
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class BarAndInfo(RichProgress):
        """A rich progress bar with each task's ``info`` field on the line below it, wrapped to the terminal."""

        def get_renderables(self):
            yield self.make_tasks_table(self.tasks)
            for task in self.tasks:
                if task.fields.get("info"):
                    yield Text("  " + task.fields["info"], overflow="fold")

    return BarAndInfo


def _BarAndInfo(*columns, **kwargs):  # noqa: N802 - a class made on first use, so that rich loads only on a terminal
    return _bar_and_info_class()(*columns, **kwargs)


class Progress:
    """A live bar on a terminal (rich); one plain line per step otherwise (CI logs)."""

    KEYS = ("reward/mean", "reward/accuracy", "rollout/response_len_mean", "loss/policy", "perf/step_s")

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total = total
        self.live = enabled and sys.stdout.isatty()
        self._bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

            # the metrics go on a line of their own, below the bar: one line would cut them at 80 columns
            self._bar = _BarAndInfo(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(bar_width=None),
                                    TimeRemainingColumn(), expand=False)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, metrics: dict) -> None:
        info = "  ".join(f"{k.split('/')[-1]}={metrics[k]:.3g}" for k in self.KEYS if k in metrics)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            print(f"[rl] step {step}/{self.total}  {info}", flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
