"""RewardPool: grade responses in worker processes with a wall-clock limit enforced from outside.

Each worker (see :mod:`rewards.worker`) runs one job at a time: one (request, reward) pair. The parent
records when it handed a job over; a worker that overruns ``timeout_s`` is killed (SIGKILL) and replaced,
and that job becomes a ``status="timeout"`` result. A worker that dies mid-job (segfault, memory limit,
``sys.exit`` in a plug-in) gives a ``status="error"`` result and is replaced. So one pathological response
costs at most ``timeout_s`` of one worker and never blocks the batch; nothing in the parent uses signals,
so the pool works from any thread and inside Ray actors.

Workers come from the ``forkserver`` start method with math-verify preloaded, so a replacement is forked
warm in milliseconds rather than re-importing sympy (``start_method="spawn"`` also works, slower to replace).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import spawn
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler

from rl.types import RewardResult
from rewards.audit import Auditor
from rewards.base import RewardRequest, RewardSpec, failed_result
from rewards.plugins import check_spec
from rewards.worker import worker_main

_PRELOAD_MODULES = ["rewards._forkserver_preload"]
# Replacement workers that keep failing to start mean something is broken for good (not one bad input).
_MAX_CONSECUTIVE_START_FAILURES = 3
_WORKER_NAME_PREFIX = "reward-worker-"


def _skip_main_for_reward_workers(get_preparation_data):
    """Wrap multiprocessing's ``spawn.get_preparation_data`` so that our workers do not re-run ``__main__``.

    spawn/forkserver children normally re-import the parent's main script (as ``__mp_main__``): for the
    ``rl`` CLI that imports the whole driver and torch into every worker, before the worker's memory limit,
    and a script without a ``__main__`` guard would start pools recursively. Reward workers load everything
    by spec, so they skip it. Other processes (selected by name) are untouched.
    """

    def wrapped(name: str) -> dict:
        data = get_preparation_data(name)
        if name.startswith(_WORKER_NAME_PREFIX):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    wrapped.skips_main_for_reward_workers = True
    return wrapped


if not getattr(spawn.get_preparation_data, "skips_main_for_reward_workers", False):
    spawn.get_preparation_data = _skip_main_for_reward_workers(spawn.get_preparation_data)


@dataclass
class _Job:
    job_id: int
    request_index: int
    spec_index: int


class _Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, ctx, specs: list[RewardSpec], memory_limit_mb: int | None, index: int) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=worker_main,
            args=(child_conn, specs, memory_limit_mb),
            name=f"{_WORKER_NAME_PREFIX}{index}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self.conn: Connection = parent_conn
        self.state = "starting"  # starting -> idle <-> busy; dead
        self.started_at = time.monotonic()
        self.loading: str | None = None
        self.job: _Job | None = None
        self.job_started_at = 0.0
        self.components: list[tuple[str, bool]] = []

    def kill(self) -> None:
        self.state = "dead"
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5.0)
        self.conn.close()

    def stop(self) -> None:
        """Ask an idle worker to exit; kill it if it does not."""
        if self.state == "idle":
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=1.0)
        self.kill()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.state != "dead":
            worker.stop()


@dataclass
class _Stats:
    """Counters of one reward component since the last metrics reset."""

    count: int = 0
    timeouts: int = 0
    parse_fails: int = 0
    errors: int = 0
    time_sum: float = 0.0
    time_max: float = 0.0
    score_sum: float = 0.0
    audited: int = 0
    audit_disagreements: int = 0

    def add(self, result: RewardResult) -> None:
        self.count += 1
        self.timeouts += result.status == "timeout"
        self.parse_fails += result.status == "parse_fail"
        self.errors += result.status == "error"
        self.time_sum += result.time_s
        self.time_max = max(self.time_max, result.time_s)
        self.score_sum += result.score


@dataclass
class _PoolStats:
    components: dict[str, _Stats] = field(default_factory=dict)
    requests: int = 0
    correct: int = 0
    score_sum: float = 0.0
    worker_restarts: int = 0


class RewardPool:
    """Grades batches of requests with the configured rewards in worker processes.

    specs:          the rewards; combined score = sum(weight * component score).
    num_workers:    worker processes (each grades one job at a time).
    timeout_s:      wall-clock limit per (request, reward) job; an overrunning worker is killed and replaced.
    audit_fraction: fraction of a verifier's "incorrect" verdicts re-checked by :mod:`rewards.audit`.
    audit_log_path: JSONL file for audit disagreements (None: only counted).
    seed:           seed of the audit sampling.
    start_method:   ``"forkserver"`` (default; warm, fast replacement) or ``"spawn"``.
    memory_limit_mb: address-space limit of each worker (None: unlimited).
    startup_timeout_s: how long loading + smoke-calling every reward in a new worker may take.

    Start-up loads and smoke-calls every spec in the workers and raises ValueError naming the bad spec.
    ``score`` may be called from any thread (calls are serialized); use as a context manager or ``close()``.
    """

    def __init__(
        self,
        specs: list[RewardSpec],
        num_workers: int = 2,
        timeout_s: float = 5.0,
        audit_fraction: float = 0.0,
        audit_log_path: str | None = None,
        seed: int = 0,
        *,
        start_method: str = "forkserver",
        memory_limit_mb: int | None = 4096,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if not specs:
            raise ValueError("RewardPool needs at least one RewardSpec, e.g. [RewardSpec('math_verify')]")
        specs = [RewardSpec(name=s) if isinstance(s, str) else s for s in specs]
        for spec in specs:
            if not isinstance(spec, RewardSpec):
                raise ValueError(f"RewardPool specs must be RewardSpec objects, got {spec!r}")
            check_spec(spec)
        if not (isinstance(num_workers, int) and num_workers >= 1):
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        self.specs = specs
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._memory_limit_mb = memory_limit_mb
        self._auditor = Auditor(audit_fraction, audit_log_path, seed)
        self._lock = threading.Lock()
        self._closed = False
        self._next_job_id = 0
        self._worker_count = 0
        self._consecutive_start_failures = 0
        self._stats = _PoolStats()
        self._first_errors: dict[str, str] = {}  # reward name -> its first error text since take_first_errors()
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Only takes effect if this process has not started its forkserver yet; otherwise workers start cold.
            self._ctx.set_forkserver_preload(_PRELOAD_MODULES)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        try:
            for _ in range(num_workers):
                self._workers.append(self._new_worker())
            self._wait_for_startup()
        except BaseException:
            self.close()
            raise
        first = self._workers[0].components
        self.names = _unique_names([name for name, _ in first])
        verifiers = [i for i, (_, is_verifier) in enumerate(first) if is_verifier]
        self._verifier_index: int | None = verifiers[0] if verifiers else None
        self._stats.components = {name: _Stats() for name in self.names}

    # ----------------------------------------------------------------------------------------- lifecycle

    def _new_worker(self) -> _Worker:
        self._worker_count += 1
        return _Worker(self._ctx, self.specs, self._memory_limit_mb, self._worker_count)

    def _wait_for_startup(self) -> None:
        """Block until every worker is ready; raise ValueError naming the spec that broke one."""
        while any(w.state == "starting" for w in self._workers):
            starting = [w for w in self._workers if w.state == "starting"]
            deadline = min(w.started_at for w in starting) + self.startup_timeout_s
            ready = wait([w.conn for w in starting], timeout=max(0.0, deadline - time.monotonic()))
            for worker in starting:
                if worker.conn in ready:
                    error = self._handle_startup_message(worker)
                    if error:
                        raise ValueError(error)
            for worker in starting:
                if worker.state == "starting" and time.monotonic() > worker.started_at + self.startup_timeout_s:
                    raise ValueError(
                        f"reward spec {worker.loading!r} did not finish loading and its smoke call within "
                        f"{self.startup_timeout_s:.0f}s (startup_timeout_s); does importing or calling it hang?"
                    )

    def _handle_startup_message(self, worker: _Worker) -> str | None:
        """Process one message from a starting worker; return an error message if it failed."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            worker.kill()
            return (
                f"reward worker died (exit code {worker.process.exitcode}) while loading reward spec "
                f"{worker.loading!r}; run its import and one call in a plain Python shell to see why"
            )
        kind = message[0]
        if kind == "loading":
            worker.loading = message[1]
        elif kind == "ready":
            worker.state = "idle"
            worker.components = message[2]
        elif kind == "load_error":
            worker.kill()
            return f"reward spec {message[1]!r} failed at start-up: {message[2]}"
        return None

    def close(self) -> None:
        """Stop every worker (idempotent); waits for a ``score`` call running in another thread."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- scoring

    def score(self, requests: list[RewardRequest]) -> list[RewardResult]:
        """Grade every request with every reward; one combined result per request, in order.

        score = sum(weight * component score); ``correct`` comes from the first verifier reward if any,
        else ``score > 0``; ``components`` maps reward name -> component score. Never raises for bad model
        output: timeouts, crashes and parse failures are fail-closed results, counted in :meth:`metrics`.
        """
        requests = list(requests)
        for request in requests:
            if not isinstance(request, RewardRequest):
                raise ValueError(f"score() takes RewardRequest objects, got {type(request).__name__}")
        with self._lock:
            if self._closed:
                raise ValueError("this RewardPool is closed; create a new one")
            components = self._run_jobs(requests)
            results = [self._combine(parts) for parts in components]
            self._record(requests, components, results)
        return results

    def _run_jobs(self, requests: list[RewardRequest]) -> list[list[RewardResult]]:
        num_specs = len(self.specs)
        out: list[list[RewardResult | None]] = [[None] * num_specs for _ in requests]
        pending = deque()
        for request_index in range(len(requests)):
            for spec_index in range(num_specs):
                self._next_job_id += 1
                pending.append(_Job(self._next_job_id, request_index, spec_index))
        remaining = len(pending)
        while remaining:
            finished = self._dispatch(pending, requests)
            if remaining > len(finished):
                finished += self._collect()
            for job, result in finished:
                out[job.request_index][job.spec_index] = result
                remaining -= 1
        return out  # type: ignore[return-value]

    def _dispatch(self, pending: deque, requests: list[RewardRequest]) -> list[tuple[_Job, RewardResult]]:
        """Hand pending jobs to idle workers; return jobs that failed before reaching a worker."""
        failed: list[tuple[_Job, RewardResult]] = []
        for worker in self._workers:
            while pending and worker.state == "idle":
                job = pending.popleft()
                try:
                    # Pickle first: unpicklable metadata is this request's problem, not the worker's.
                    payload = ForkingPickler.dumps((job.job_id, job.spec_index, requests[job.request_index]))
                except Exception as exc:  # pickling can raise almost anything (TypeError, PicklingError, ...)
                    failed.append((job, failed_result(
                        "error", f"request could not be sent to a worker ({type(exc).__name__}: {exc}); "
                        "RewardRequest.metadata must be picklable")))
                    continue
                worker.job, worker.job_started_at, worker.state = job, time.monotonic(), "busy"
                try:
                    worker.conn.send_bytes(payload)
                except OSError:
                    # Died while idle: the job never ran, so it goes back in the queue uncounted.
                    worker.job = None
                    pending.appendleft(job)
                    self._replace(worker)
        return failed

    def _collect(self) -> list[tuple[_Job, RewardResult]]:
        """Wait for the next message or deadline; return the jobs that finished (or were failed)."""
        active = [w for w in self._workers if w.state in ("busy", "starting")]
        assert active, "no worker is running or starting"
        now = time.monotonic()
        deadlines = [
            w.job_started_at + self.timeout_s if w.state == "busy" else w.started_at + self.startup_timeout_s
            for w in active
        ]
        ready = wait([w.conn for w in active], timeout=max(0.0, min(deadlines) - now))
        done: list[tuple[_Job, RewardResult]] = []
        for worker in active:
            if worker.conn in ready:
                done.extend(self._read_message(worker))
        now = time.monotonic()
        for worker in active:
            if worker.state == "busy" and now >= worker.job_started_at + self.timeout_s:
                job, elapsed = worker.job, now - worker.job_started_at
                self._replace(worker)
                done.append((job, failed_result(
                    "timeout", f"grading exceeded {self.timeout_s:g}s; the worker was killed and replaced", elapsed)))
            elif worker.state == "starting" and now >= worker.started_at + self.startup_timeout_s:
                self._start_failed(worker, f"did not become ready within {self.startup_timeout_s:g}s")
        return done

    def _read_message(self, worker: _Worker) -> list[tuple[_Job, RewardResult]]:
        if worker.state == "starting":
            error = self._handle_startup_message(worker)
            if error:
                self._start_failed(worker, error)
            elif worker.state == "idle":
                self._consecutive_start_failures = 0
            return []
        try:
            _, job_id, result = worker.conn.recv()
        except (EOFError, OSError):
            job, elapsed = worker.job, time.monotonic() - worker.job_started_at
            self._replace(worker)  # reaps the dead process, so its exit code is known below
            return [(job, failed_result(
                "error", f"the reward worker crashed (exit code {worker.process.exitcode}) on this input", elapsed))]
        job = worker.job
        assert job is not None and job.job_id == job_id, (job, job_id)
        # Time as the parent saw it (includes transfer), so it matches what timeouts are measured against.
        result.time_s = time.monotonic() - worker.job_started_at
        worker.job, worker.state = None, "idle"
        return [(job, result)]

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._new_worker()
        self._stats.worker_restarts += 1

    def _start_failed(self, worker: _Worker, reason: str) -> None:
        self._consecutive_start_failures += 1
        if self._consecutive_start_failures >= _MAX_CONSECUTIVE_START_FAILURES:
            raise RuntimeError(
                f"{self._consecutive_start_failures} replacement reward workers in a row failed to start; last: {reason}"
            )
        self._replace(worker)

    def _combine(self, parts: list[RewardResult]) -> RewardResult:
        score = sum(spec.weight * part.score for spec, part in zip(self.specs, parts))
        verifier = parts[self._verifier_index] if self._verifier_index is not None else None
        status, error, extracted = "ok", None, None
        if verifier is not None:
            status, error, extracted = verifier.status, verifier.error, verifier.extracted
        # Every failing component's reason, so a sample shows all of them (the verifier's reason comes first).
        reasons = [error] if error else []
        for index, (name, part) in enumerate(zip(self.names, parts)):
            if part.status != "ok" and index != self._verifier_index:
                if status == "ok":
                    status = part.status
                reasons.append(f"{name}: {part.error}")
        error = "; ".join(reasons) or None
        if extracted is None:
            extracted = next((part.extracted for part in parts if part.extracted is not None), None)
        return RewardResult(
            score=float(score),
            correct=verifier.correct if verifier is not None else score > 0,
            extracted=extracted,
            status=status,
            error=error,
            time_s=sum(part.time_s for part in parts),
            components={name: part.score for name, part in zip(self.names, parts)},
        )

    def _record(self, requests, components, results) -> None:
        stats = self._stats
        for request, parts, result in zip(requests, components, results):
            stats.requests += 1
            stats.correct += result.correct
            stats.score_sum += result.score
            for name, part in zip(self.names, parts):
                stats.components[name].add(part)
                if part.status == "error":
                    self._first_errors.setdefault(name, part.error or "(no error text)")
            if self._verifier_index is not None:
                verdict = parts[self._verifier_index]
                if self._auditor.should_audit(verdict):
                    name = self.names[self._verifier_index]
                    stats.components[name].audited += 1
                    stats.components[name].audit_disagreements += self._auditor.audit(name, request, verdict)

    # ------------------------------------------------------------------------------------------- metrics

    def take_first_errors(self) -> dict[str, str]:
        """Reward name -> the text of its first ``status="error"`` result since the last call (rewards without an
        error are left out); clears. Independent of :meth:`metrics` resets."""
        with self._lock:
            out, self._first_errors = self._first_errors, {}
            return out

    def metrics(self, reset: bool = True) -> dict[str, float]:
        """Counters since the last reset, namespaced ``reward/``.

        Per reward ``<name>``: ``timeout_rate``, ``parse_fail_rate``, ``error_rate``, ``num_errors``, ``mean_time_s``,
        ``max_time_s``, ``mean_score``, and for the verifier ``audited``, ``audit_disagreements``.
        Pool-wide: ``num_graded``, ``accuracy``, ``mean_score``, ``audit_disagreements``, ``worker_restarts``.
        """
        with self._lock:
            stats = self._stats
            out: dict[str, float] = {}
            for name, s in stats.components.items():
                n = max(s.count, 1)
                out[f"reward/{name}/timeout_rate"] = s.timeouts / n
                out[f"reward/{name}/parse_fail_rate"] = s.parse_fails / n
                out[f"reward/{name}/error_rate"] = s.errors / n
                out[f"reward/{name}/num_errors"] = float(s.errors)
                out[f"reward/{name}/mean_time_s"] = s.time_sum / n
                out[f"reward/{name}/max_time_s"] = s.time_max
                out[f"reward/{name}/mean_score"] = s.score_sum / n
                if self._verifier_index is not None and name == self.names[self._verifier_index]:
                    out[f"reward/{name}/audited"] = float(s.audited)
                    out[f"reward/{name}/audit_disagreements"] = float(s.audit_disagreements)
            out["reward/num_graded"] = float(stats.requests)
            out["reward/accuracy"] = stats.correct / max(stats.requests, 1)
            out["reward/mean_score"] = stats.score_sum / max(stats.requests, 1)
            out["reward/audit_disagreements"] = float(sum(s.audit_disagreements for s in stats.components.values()))
            out["reward/worker_restarts"] = float(stats.worker_restarts)
            if reset:
                self._stats = _PoolStats(components={name: _Stats() for name in self.names})
            return out


def _unique_names(names: list[str]) -> list[str]:
    """``["length_penalty", "length_penalty"]`` -> ``["length_penalty", "length_penalty_2"]``."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
