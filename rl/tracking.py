"""Run outputs: metrics (JSONL + TensorBoard), rollout samples, a progress display, atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError as e:  # tensorboard is a declared dependency; say so instead of failing the run
                print(f"[rl] TensorBoard disabled: {e}", file=sys.stderr)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

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
        if self._tb is not None:
            self._tb.close()


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


class Progress:
    """A live bar on a terminal (rich); one plain line per step otherwise (CI logs)."""

    KEYS = ("reward/mean", "reward/accuracy", "rollout/response_len_mean", "loss/policy", "perf/step_s")

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total = total
        self.live = enabled and sys.stdout.isatty()
        self._bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
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
