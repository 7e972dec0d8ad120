"""A quiet console: every engine, learner and library line goes to a log file in the run folder; the console shows
the run's own lines, warnings and errors.

Each Ray worker of a run calls :func:`setup_worker` (Ray's ``worker_process_setup_hook``) before it hosts an actor.
It points the process's stdout and stderr (file descriptors 1 and 2, so vLLM's engine-core and worker processes,
which inherit them, are covered too) at a pipe; a thread copies every line to ``<log_dir>/worker-<pid>.log`` and
passes on to Ray's log stream, and so to the driver's console, only the lines :class:`LineFilter` lets through.
``run.verbose`` (``rl train --verbose``, ``rl eval --verbose``) lets every line through. The setting travels to
the workers in their environment (``RL_LOG_DIR``, ``RL_VERBOSE``), so it holds on a real cluster as on a laptop.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

LOG_DIR_ENV = "RL_LOG_DIR"
VERBOSE_ENV = "RL_VERBOSE"
SETUP_HOOK = "rl.console.setup_worker"

# Warnings that read like failures but are expected, with the reason each is harmless. A warning not listed here is
# shown: the list hides the known, never the unknown.
BENIGN_WARNINGS: dict[str, str] = {
    "Failed to load weights": "vLLM's in-place reload names every module that received no tensor; rotary "
    "embeddings have none (the canary checks that the weights did arrive)",
    "does not officially support disabling chunked prefill": "chunked prefill is off on CPU on purpose "
    "(rollout/engine.py: llm_kwargs)",
    "Triton is not installed": "the CPU build runs without Triton",
    "Model Runner V2 requires Triton": "the CPU build runs the V1 model runner (logged as [engine] model runner)",
    "libtcmalloc is not found": "a CPU performance hint",
    "libiomp is not found": "a CPU performance hint",
    "Reset SSM cache type": "no state-space layers in these models",
    "Inductor compilation was disabled": "eager engines on CPU (rollout.enforce_eager)",
    "Enforce eager set, disabling torch.compile": "eager engines on CPU (rollout.enforce_eager)",
    "this may affect the random state of the Python process that launched vLLM": "an engine core in its actor's "
    "process (rollout.engine_core) seeds that process; the actor hosts nothing else, and every request has its "
    "own seed",
    "doesn't allow to use `torch.set_num_threads` after the thread binding": "a CPU engine's threads are bound "
    "once at start-up (VLLM_CPU_OMP_THREADS_BIND); later requests to change them are skipped",
    "NUMA binding": "CPU engines bind their memory to the local NUMA node",
    "Setting accelerator to CPU": "DeepSpeed's accelerator on a machine without a GPU",
    "Compiling model again due to a load failure": "vLLM's compile cache holds a graph of another build or "
    "shape; it compiles again (once) and caches that",
    "Pin memory is not supported": "pinned host memory only matters for copies to a GPU",
    "Using 'pin_memory=False'": "pinned host memory only matters for copies to a GPU",
    "different tokenizers for different LoRAs": "vLLM's notice on the first LoRA request (model.lora); the "
    "adapters written by trainers/lora.py carry no tokenizer, so the base model's is used",
}
_OWN_TAGS = re.compile(r"^\[(rl|engine|learner|eval|drafter|reward)\]")
# Ray's markers in a worker's output (":actor_name:Engine", ":job_id:01000000", ...): its log monitor reads them to
# label the lines it forwards, so they always pass.
_RAY_MARKERS = (":actor_name:", ":task_name:", ":job_id:", ":event_summary:", ":info_message:")
# vLLM: "(EngineCore pid=7) WARNING 12-06 09:17:48 [file.py:12] ..."; DeepSpeed: "[2026-12-06 ...] [WARNING] [...]";
# PyTorch's C++ side: "[W1206 09:18:03.26 utils.cpp:68] Warning: ..."
_LEVEL = re.compile(r"^(?:\(\S+ pid=\d+\) )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d ")
_DS_LEVEL = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\]")
_C10_LEVEL = re.compile(r"^\[([WEIF])\d{4} ")
_PY_WARNING = re.compile(r"^\S+:\d+: (\w*Warning): ")
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b[:\s]")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_QUIET_PY_WARNINGS = ("FutureWarning", "DeprecationWarning", "PendingDeprecationWarning")


def benign_reason(line: str) -> str | None:
    """Why a warning line is harmless, or None when it is not a known one."""
    return next((why for key, why in BENIGN_WARNINGS.items() if key in line), None)


class LineFilter:
    """Decides, line by line, what reaches the console. Shown: the run's own ``[rl]``/``[engine]``/``[learner]``
    lines, errors, tracebacks (every line of one) and warnings other than :data:`BENIGN_WARNINGS` and Python's
    deprecation warnings. Hidden: progress bars and INFO/DEBUG logs. Verbose: everything."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._in_traceback = False
        self._source_line: bool | None = None  # after a Python warning: show (True) or hide its source line

    def show(self, line: str) -> bool:
        if self.verbose:
            return True
        text = _ANSI.sub("", line).rstrip("\r\n")
        if self._in_traceback:
            # A traceback runs until its first unindented line after the header (the exception itself).
            if not text[:1].isspace() and text:
                self._in_traceback = False
            return True
        if self._source_line is not None:
            shown, self._source_line = self._source_line, None
            if text.startswith((" ", "\t")):
                return shown
        if text.startswith(_RAY_MARKERS):
            return True
        if text.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
            return True
        if _OWN_TAGS.match(text):
            return True
        if _EXCEPTION_LINE.match(text):
            return True
        m = _PY_WARNING.match(text)
        if m:
            hidden = m.group(1) in _QUIET_PY_WARNINGS or benign_reason(text) is not None
            self._source_line = not hidden  # Python prints the offending source line next, indented
            return not hidden
        level = _level(text)
        if level in ("ERROR", "CRITICAL"):
            return True
        if level == "WARNING":
            return benign_reason(text) is None
        return False


def _level(text: str) -> str | None:
    for pattern in (_LEVEL, _DS_LEVEL):
        m = pattern.match(text)
        if m:
            return m.group(1)
    m = _C10_LEVEL.match(text)
    if m:
        return {"W": "WARNING", "E": "ERROR", "F": "CRITICAL", "I": "INFO"}[m.group(1)]
    return None


class _Capture:
    """The running capture of this process (one per process)."""

    def __init__(self, log_path: Path, verbose: bool) -> None:
        self.log_path = log_path
        self.filter = LineFilter(verbose)
        self._log = open(log_path, "ab", buffering=0)
        self._echo = os.dup(2)  # where the shown lines go: the stream this process had before (Ray's log stream)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=True)
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), name="rl-console", daemon=True)
        self._thread.start()

    def _pump(self, read_fd: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            self._log.write(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            shown = [ln for ln in lines if self.filter.show(ln.decode("utf-8", "replace"))]
            if shown:
                os.write(self._echo, b"".join(ln + b"\n" for ln in shown))

    def rename(self, stem: str) -> Path:
        new = self.log_path.with_name(f"{stem}-{os.getpid()}.log")
        try:
            os.replace(self.log_path, new)  # the open file keeps its place: later lines land in the new name
            self.log_path = new
        except OSError:
            pass
        return self.log_path


_capture: _Capture | None = None


def capture_output(log_dir: str | Path, verbose: bool = False) -> Path:
    """Send this process's (and its children's) output to ``log_dir/worker-<pid>.log``, echoing what the filter
    shows. Idempotent: a second call returns the first log's path."""
    global _capture
    if _capture is None:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        _capture = _Capture(log_dir / f"worker-{os.getpid()}.log", verbose)
    return _capture.log_path


def name_log(stem: str) -> Path | None:
    """Rename this process's log to ``<stem>-<pid>.log`` (an engine or a learner rank names itself at start)."""
    return _capture.rename(stem) if _capture is not None else None


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for the workers of a run: capture their output when the driver asked for
    it (``RL_LOG_DIR``). A log folder that cannot be created on this node leaves the output as it was, with a line
    saying so: a lost log must never stop a run."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return
    try:
        capture_output(log_dir, verbose=os.environ.get(VERBOSE_ENV) == "1")
    except OSError as e:
        print(f"[rl] warning: cannot write worker logs to {log_dir} on this node ({e}); output stays on the "
              "console", file=sys.stderr, flush=True)


def worker_env(log_dir: Path, verbose: bool) -> dict[str, str]:
    """The environment that carries the console setting to a run's workers (see :func:`setup_worker`)."""
    return {LOG_DIR_ENV: str(log_dir), VERBOSE_ENV: "1" if verbose else "0",
            # transformers' and huggingface_hub's progress bars (model loading, shard writing) are noise in a log
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_driver(verbose: bool) -> None:
    """The driver's side: no library progress bars or INFO logs unless verbose, and no warnings that only restate
    a default (Ray's token-authentication notice when this process starts a local cluster with auth on, DeepSpeed's
    accelerator guess on a machine without a GPU)."""
    import logging

    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for name in ("mlflow", "alembic", "wandb", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if "DS_ACCELERATOR" not in os.environ:
        try:
            import torch

            if not torch.cuda.is_available():
                os.environ["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed would pick, without its warning
        except ImportError:
            pass
