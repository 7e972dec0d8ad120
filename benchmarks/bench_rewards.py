"""Throughput and latency of math grading: RewardPool vs a plain single-process loop of math-verify calls.

    python benchmarks/bench_rewards.py [--num 500] [--workers 2] [--no-write]

Workload: every MATH-500 gold answer inside a model-style response (a ``<think>`` block and some worked
steps, then a boxed / "answer is" / wrong / missing final answer), one response per problem, fixed seed.
Runs, in one process:
1. clean mix: plain loop ``verify(parse(gold), parse(response))`` (math-verify defaults, main thread, its
   signal timeout), the same loop over :func:`rewards.grade_math`, and ``RewardPool.score`` with N workers;
2. the same mix with 5% pathological responses: the plain loop capped by math-verify's own per-call timeout
   (which only exists on the main thread; in a thread or Ray actor it must be disabled and the loop would
   be unbounded) vs the pool with the same limit enforced from outside.
Appends a dated section to docs/benchmarks.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rewards import RewardPool, RewardRequest, RewardSpec, grade_math  # noqa: E402

DATA_DIR = Path(os.environ.get("RL_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
DOC = REPO_ROOT / "docs" / "benchmarks.md"
RUN_DATE = "2026-11-23"
MACHINE = "2-core CPU, 24 GB, no GPU"
PATHOLOGICAL = [
    "\\boxed{10^{10^{10}}}",
    "\\boxed{((9!)!)!}",
    "\\boxed{(x+1)^{100000}}",
    "\\boxed{\\int_0^\\infty e^{-x^{1000}}dx}",
    "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
]


def build_mix(num: int, pathological_fraction: float, seed: int) -> list[tuple[RewardRequest, bool | None, str]]:
    """(request, intended verdict, kind of response) triples; the verdict is None for pathological rows."""
    rows = [json.loads(line) for line in (DATA_DIR / "math500.jsonl").read_text().split("\n") if line.strip()]
    rng = random.Random(seed)
    rows = (rows * (num // len(rows) + 1))[:num]
    mix = []
    for index, row in enumerate(rows):
        gold = row["answer"]
        other = rows[(index * 7 + 3) % len(rows)]["answer"]
        steps = "\n".join(
            f"Step {k}: from the condition, $a_{k} = {rng.randint(2, 99)} \\cdot {rng.randint(2, 9)}$, "
            f"so we substitute and simplify the expression again." for k in range(1, rng.randint(6, 20))
        )
        think = f"<think>\n{row['problem'][:400]}\nLet me think. {steps}\nMaybe the answer is {other}?\n</think>\n"
        draw = rng.random()
        if draw < 0.45:
            kind, label = "boxed correct", True
            response = f"{think}{steps[:300]}\nTherefore, the final answer is $\\boxed{{{gold}}}$."
        elif draw < 0.55:
            kind, label, response = "'answer is' correct", True, f"{think}So the answer is ${gold}$."
        elif draw < 0.85:
            kind, label = "boxed wrong", gold.strip() == other.strip()
            response = f"{think}{steps[:300]}\nThus $\\boxed{{{other}}}$."
        elif draw < 0.95:
            kind, label, response = "truncated", False, f"{think}{steps} and then we"  # no final answer
        else:
            kind, label, response = "fbox correct", True, f"{think}The result is \\fbox{{{gold}}}."
        mix.append((RewardRequest(row["problem"], response, gold), label, kind))
    num_bad = int(round(pathological_fraction * num))
    for position in rng.sample(range(num), num_bad):
        request = mix[position][0]
        bad = PATHOLOGICAL[position % len(PATHOLOGICAL)]
        mix[position] = (RewardRequest(request.prompt, "<think>hmm</think> so " + bad, request.answer), None, "pathological")
    return mix


def plain_math_verify_loop(mix, cap_s: int | None) -> tuple[list[bool], list[float]]:
    """What most RL code does: parse gold and response with math-verify, verify, on the main thread."""
    import math_verify

    kwargs_parse = {} if cap_s is None else {"parsing_timeout": cap_s}
    kwargs_verify = {} if cap_s is None else {"timeout_seconds": cap_s}
    verdicts, times = [], []
    for request, _, _ in mix:
        start = time.perf_counter()
        answer = request.answer.strip()
        gold = math_verify.parse(answer if answer.startswith("$") else f"${answer}$", **kwargs_parse)
        pred = math_verify.parse(request.response, **kwargs_parse)
        verdicts.append(bool(math_verify.verify(gold, pred, **kwargs_verify)))
        times.append(time.perf_counter() - start)
    return verdicts, times


def grade_math_loop(mix) -> tuple[list[bool], list[float]]:
    verdicts, times = [], []
    for request, _, _ in mix:
        start = time.perf_counter()
        verdicts.append(grade_math(request.prompt, request.response, request.answer, {}).correct)
        times.append(time.perf_counter() - start)
    return verdicts, times


def pool_run(pool: RewardPool, mix) -> tuple[list, float]:
    start = time.perf_counter()
    results = pool.score([request for request, _, _ in mix])
    return results, time.perf_counter() - start


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def cpu_scaling(workers: int, n: int = 10_000_000) -> float:
    """Speed-up of ``workers`` processes over one on a pure-Python CPU burn, measured now (other jobs on a
    shared machine take cores away; this is the ceiling for the pool's speed-up)."""
    import multiprocessing

    start = time.perf_counter()
    for _ in range(workers):
        _burn(n)
    serial = time.perf_counter() - start
    with multiprocessing.get_context("spawn").Pool(workers) as procs:
        procs.map(_burn, [1000] * workers)  # start-up outside the timing
        start = time.perf_counter()
        procs.map(_burn, [n] * workers)
        parallel = time.perf_counter() - start
    return serial / parallel


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def agreement(verdicts, mix) -> str:
    labelled = [(v, label) for v, (_, label, _) in zip(verdicts, mix) if label is not None]
    return f"{sum(v == label for v, label in labelled) / len(labelled):.1%}"


def misses_by_kind(verdicts, mix) -> str:
    """'fbox correct 24/24, ...': how many rows of each kind got the wrong verdict."""
    totals: dict[str, list[int]] = {}
    for verdict, (_, label, kind) in zip(verdicts, mix):
        if label is not None:
            count = totals.setdefault(kind, [0, 0])
            count[0] += verdict != label
            count[1] += 1
    wrong = [f"{kind} {bad}/{total}" for kind, (bad, total) in totals.items() if bad]
    return ", ".join(wrong) if wrong else "none"


_UNCAPPED_SNIPPET = """
import logging, math_verify
logging.disable(logging.WARNING)
gold = math_verify.parse("$5$", parsing_timeout=None)
pred = math_verify.parse(RESPONSE, parsing_timeout=None)
math_verify.verify(gold, pred, timeout_seconds=None)
"""


def uncapped_plain_call(response: str, watchdog_s: float) -> str:
    """Run one plain, uncapped math-verify call (as it must run off the main thread) under a watchdog."""
    import subprocess

    code = _UNCAPPED_SNIPPET.replace("RESPONSE", repr(response))
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-c", code], timeout=watchdog_s, check=False, capture_output=True)
    except subprocess.TimeoutExpired:
        return f"still running after {watchdog_s:.0f} s (killed by the benchmark's watchdog)"
    return f"finished in {time.perf_counter() - start:.1f} s"


def row(name: str, n: int, wall: float, times: list[float], extra: str) -> str:
    return (f"| {name} | {n} | {wall:.1f} | {n / wall:.1f} | {1000 * pct(times, 0.5):.1f} | "
            f"{1000 * pct(times, 0.99):.1f} | {extra} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=500, help="responses per run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout-s", type=int, default=2, help="per-response limit in the pathological run")
    parser.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # math-verify logs every timeout
    load = os.getloadavg()[0]
    total_start = time.perf_counter()
    scaling = cpu_scaling(args.workers)
    print(f"CPU scaling available now: {scaling:.2f}x with {args.workers} processes (load average {load:.1f})")
    lines = []

    clean = build_mix(args.num, 0.0, seed=0)
    with RewardPool([RewardSpec("math_verify")], num_workers=args.workers, timeout_s=5.0) as pool:
        pool.score([request for request, _, _ in clean[:20]])  # warm-up (lru caches stay cold: distinct golds)
        pool.metrics()
        plain_v, plain_t = plain_math_verify_loop(clean, cap_s=None)
        plain_wall = sum(plain_t)
        ours_v, ours_t = grade_math_loop(clean)
        ours_wall = sum(ours_t)
        results, pool_wall = pool_run(pool, clean)
        metrics = pool.metrics()
    pool_t = [r.time_s for r in results]
    lines += [
        f"Clean mix: {args.num} MATH-500 golds in model-style responses (45% boxed correct, 10% 'answer is', "
        "30% boxed wrong, 10% truncated, 5% `\\fbox`).",
        "",
        "| run | responses | wall s | verifications/s | p50 ms | p99 ms | notes |",
        "|---|---|---|---|---|---|---|",
        row("plain loop: math-verify parse+verify", args.num, plain_wall, plain_t,
            f"agrees with intended labels {agreement(plain_v, clean)}; wrong verdicts: {misses_by_kind(plain_v, clean)}"),
        row("plain loop: rewards.grade_math", args.num, ours_wall, ours_t,
            f"agrees with intended labels {agreement(ours_v, clean)}; wrong verdicts: {misses_by_kind(ours_v, clean)}"),
        row(f"RewardPool, {args.workers} workers", args.num, pool_wall, pool_t,
            f"agrees {agreement([r.correct for r in results], clean)}; parse_fail "
            f"{metrics['reward/math_verify/parse_fail_rate']:.1%}, timeouts {metrics['reward/math_verify/timeout_rate']:.1%}"),
        "",
        f"Pool vs plain math-verify loop: **{plain_wall / pool_wall:.2f}x** throughput; "
        f"pool vs plain grade_math loop: **{ours_wall / pool_wall:.2f}x**. "
        "Pool latency = time from handing a response to a worker to its result (excludes queueing).",
        "",
    ]
    print("\n".join(lines), flush=True)

    dirty = build_mix(args.num, 0.05, seed=0)
    num_bad = sum(label is None for _, label, _ in dirty)
    with RewardPool([RewardSpec("math_verify")], num_workers=args.workers, timeout_s=args.timeout_s) as pool:
        plain_v, plain_t = plain_math_verify_loop(dirty, cap_s=args.timeout_s)
        plain_wall = sum(plain_t)
        results, pool_wall = pool_run(pool, dirty)
        metrics = pool.metrics()
    pool_t = [r.time_s for r in results]
    bad_plain = [t for t, (_, label, _) in zip(plain_t, dirty) if label is None]
    uncapped = uncapped_plain_call("so \\boxed{10^{10^{10}}}", watchdog_s=15.0)
    section2 = [
        f"Same mix with 5% pathological responses ({num_bad} of {args.num}: `10^{{10^{{10}}}}`, factorial tower, "
        f"`(x+1)^{{100000}}`, an integral, 300 nested parentheses); limit {args.timeout_s} s per response.",
        "",
        "| run | responses | wall s | verifications/s | p50 ms | p99 ms | notes |",
        "|---|---|---|---|---|---|---|",
        row(f"plain loop, math-verify's own {args.timeout_s} s signal cap", args.num, plain_wall, plain_t,
            f"pathological rows took {min(bad_plain):.1f}-{max(bad_plain):.1f} s each and came back as a plain "
            "False (not distinguishable from a wrong answer)"),
        row(f"RewardPool, {args.workers} workers, timeout {args.timeout_s} s", args.num, pool_wall, pool_t,
            f"{int(round(metrics['reward/math_verify/timeout_rate'] * args.num))} counted timeouts, "
            f"{int(metrics['reward/worker_restarts'])} workers replaced; agrees on clean rows "
            f"{agreement([r.correct for r in results], dirty)}"),
        "",
        f"Pool vs capped plain loop: **{plain_wall / pool_wall:.2f}x** throughput. The cap only exists on the "
        "main thread (`signal.alarm`); off it (threads, Ray actor methods) math-verify must run uncapped, and one "
        f"uncapped plain call on `10^{{10^{{10}}}}` was {uncapped}, so that loop is unbounded.",
        "",
    ]
    print("\n".join(section2), flush=True)
    lines += section2
    total = time.perf_counter() - total_start
    header = (f"## {RUN_DATE} — {MACHINE}\n\n`python benchmarks/bench_rewards.py --num {args.num} --workers "
              f"{args.workers}` ({platform.python_version()}, {os.cpu_count()} cores, load average "
              f"{load:.1f} at start; machine shared with other jobs; whole run {total:.0f} s).\n\n"
              f"Parallelism actually available during the run: {args.workers} processes of a pure-Python CPU burn ran "
              f"**{scaling:.2f}x** faster than one (ideal {args.workers}x) — the ceiling for the pool's speed-up "
              "over a single-process loop.\n\n")
    if not args.no_write:
        write_section(header + "\n".join(lines))
        print(f"wrote {DOC}")


def write_section(section: str) -> None:
    """Replace this date's section of the benchmark doc (or append it)."""
    title = section.split("\n", 1)[0]
    text = DOC.read_text() if DOC.exists() else (
        "# Reward grading benchmarks\n\nProduced by `benchmarks/bench_rewards.py`; newest section last.\n\n")
    if title in text:
        before, _, after = text.partition(title)
        next_section = after.find("\n## ")
        text = before + section.rstrip() + "\n" + (after[next_section:] if next_section >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
