"""The reward worker process: load every configured reward once, smoke-call it, then grade one job at a time.

Protocol on the worker's end of a ``multiprocessing`` pipe (the parent is :class:`rewards.pool.RewardPool`):

worker -> parent: ``("loading", spec_name)`` before loading each spec;
                  ``("load_error", spec_name, message)`` and exit, when a spec cannot be loaded or fails its
                  smoke call / self-test;
                  ``("ready", pid, [(component_name, is_verifier), ...])`` once everything is loaded;
                  ``("result", job_id, RewardResult)`` for each job.
parent -> worker: ``(job_id, spec_index, RewardRequest)`` for each job; ``None`` to stop.

Plug-ins are re-loaded here from their spec (never pickled from the parent). The parent enforces time
limits by killing this process, so nothing here needs signals or threads.
"""

from __future__ import annotations

import os
import resource
import signal
from multiprocessing.connection import Connection

from rewards.base import SMOKE_REQUEST, RewardSpec, shorten, call_reward
from rewards.plugins import load_reward

_MAX_EXTRACTED_CHARS = 1_000


def warm_up() -> None:
    """Import math-verify and grade one example so forked workers start warm (used by the forkserver)."""
    try:
        from rewards.math_verifier import grade_math  # noqa: PLC0415

        grade_math(SMOKE_REQUEST.prompt, SMOKE_REQUEST.response, SMOKE_REQUEST.answer, {})
    except Exception:  # a cold start is only slower; the worker's own smoke call reports real breakage
        pass


def _limit_memory(memory_limit_mb: int | None) -> None:
    # A huge integer (10^{10^{10}}) must hit MemoryError here rather than push the machine into swap/OOM.
    if memory_limit_mb is None:
        return
    limit = memory_limit_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def worker_main(conn: Connection, specs: list[RewardSpec], memory_limit_mb: int | None) -> None:
    """Entry point of a worker process (see the module docstring for the protocol)."""
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory(memory_limit_mb)
    entries = []
    for spec in specs:
        conn.send(("loading", spec.name))
        try:
            entry = load_reward(spec)
        except ValueError as exc:
            conn.send(("load_error", spec.name, str(exc)))
            return
        smoke = call_reward(entry, SMOKE_REQUEST, spec.kwargs)
        if smoke.status != "ok":
            conn.send(("load_error", spec.name, f"smoke call failed ({smoke.status}): {smoke.error}"))
            return
        if entry.self_test is not None:
            try:
                entry.self_test()
            except Exception as exc:  # report any self-test failure to the parent as a start-up error
                conn.send(("load_error", spec.name, f"self-test failed: {type(exc).__name__}: {exc}"))
                return
        entries.append(entry)
    conn.send(("ready", os.getpid(), [(entry.name, entry.is_verifier) for entry in entries]))

    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # parent went away
        if message is None:
            return
        job_id, spec_index, request = message
        result = call_reward(entries[spec_index], request, specs[spec_index].kwargs)
        if result.extracted is not None and len(result.extracted) > _MAX_EXTRACTED_CHARS:
            result.extracted = result.extracted[:_MAX_EXTRACTED_CHARS]
        if result.error is not None:
            result.error = shorten(result.error, 2_000)
        conn.send(("result", job_id, result))
