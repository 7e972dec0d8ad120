"""Summarize a test run's timeline (``RL_TEST_TIMELINE=FILE bash scripts/test.sh``): per worker, its busy time,
its first start and last stop, and its slowest files; the run's wall time from the first start to the last stop.

    python -m tests.timeline FILE
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def summarize(rows: list[dict]) -> str:
    t0, t1 = min(r["start"] for r in rows), max(r["stop"] for r in rows)
    lines = [f"wall {t1 - t0:.0f} s from the first test's start to the last one's stop"]
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_worker[r["worker"]].append(r)
    for worker, rs in sorted(by_worker.items()):
        files: dict[str, float] = defaultdict(float)
        for r in rs:
            files[r["test"].split("::", 1)[0]] += r["stop"] - r["start"]
        busy = sum(files.values())
        first, last = min(r["start"] for r in rs) - t0, max(r["stop"] for r in rs) - t0
        lines.append(f"{worker}: busy {busy:.0f} s, from {first:.0f} s to {last:.0f} s (idle at the end "
                     f"{t1 - t0 - last:.0f} s)")
        for name, s in sorted(files.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"  {s:7.1f} s  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m tests.timeline FILE (written by RL_TEST_TIMELINE=FILE)")
    with open(argv[0]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"{argv[0]} holds no test phases")
    print(summarize(rows))


if __name__ == "__main__":
    main()
