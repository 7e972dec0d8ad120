"""Evaluation statistics: graded samples as records, pass@k / maj@k / mean@n summaries with bootstrap CIs per
benchmark and pooled, flat metrics for training, the in-training evaluation, and the report (Markdown table, plot,
throughput over runs). Formulas: :mod:`rl.metrics`. No I/O but the report files; no engines.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rl.metrics import Estimate, SampleSummary, summarize_samples
from rl.types import PromptItem, RewardResult, Rollout

# Metadata fields that define a difficulty breakdown when the data has them.
GROUP_FIELDS = ("level", "difficulty", "subject", "type")

GenerateFn = Callable[[list[PromptItem], int], list[list[Rollout]]]
ScoreFn = Callable[[list[PromptItem], list[list[Rollout]]], list[RewardResult]]


# ---------------------------------------------------------------------------------------------------- records
@dataclass
class SampleRecord:
    """One graded generation; a line of ``generations.jsonl``. ``response``/``answer``/``prompt`` are the fields
    ``rl verify --input`` reads, so a file can be re-graded later."""

    benchmark: str
    id: str
    sample_index: int
    prompt: str
    response: str
    answer: str
    extracted: str | None
    correct: bool
    score: float
    status: str
    num_tokens: int
    finish_reason: str
    group: dict[str, str] = field(default_factory=dict)
    # DC-CoT evaluations only: the latency measure (director + longest worker per block), all tokens, the grammar
    longest_path_tokens: int | None = None
    total_tokens: int | None = None
    format_valid: bool | None = None


def make_records(benchmark: str, items: list[PromptItem], groups: list[list[Rollout]],
                 results: list[RewardResult], group_fields: Sequence[str] = GROUP_FIELDS) -> list[SampleRecord]:
    """Join prompts, their sample groups and the flat grading results (group-major order) into records."""
    flat = [(it, i, r) for it, g in zip(items, groups, strict=True) for i, r in enumerate(g)]
    if len(flat) != len(results):
        raise ValueError(f"{len(results)} grading results for {len(flat)} generations")
    out = []
    for (it, i, ro), res in zip(flat, results):
        grp = {f: str(it.metadata[f]) for f in group_fields if it.metadata.get(f) not in (None, "")}
        out.append(SampleRecord(benchmark, it.id, i, it.prompt, ro.response_text, it.answer, res.extracted,
                                bool(res.correct), float(res.score), res.status, ro.num_response_tokens,
                                ro.finish_reason, grp))
    return out


def _problem_matrix(records: list[SampleRecord]) -> tuple[list[str], list[list[bool]], list[list[str | None]]]:
    """Records of complete problems -> (problem ids, [P][n] verdicts, [P][n] answers), in first-seen order."""
    by_id: dict[tuple[str, str], dict[int, SampleRecord]] = {}
    for r in records:
        by_id.setdefault((r.benchmark, r.id), {})[r.sample_index] = r
    rows = [[g[j] for j in sorted(g)] for g in by_id.values()]
    return [i for _, i in by_id], [[r.correct for r in row] for row in rows], [[r.extracted for r in row] for row in rows]


# ---------------------------------------------------------------------------------------------------- statistics
def default_ks(n: int) -> list[int]:
    """Powers of two up to n, and n itself: the columns of the table."""
    ks = [k for k in (1 << i for i in range(n.bit_length())) if k <= n]
    return ks if ks[-1] == n else ks + [n]


def check_ks(ks: Sequence[int], n: int) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"pass@k needs 1 <= k <= n: got k={bad} with n={n} samples per problem; raise --n or "
                         f"drop those k")
    return ks


def summarize_records(records: list[SampleRecord], ks: Sequence[int], *, num_resamples: int = 1000,
                      alpha: float = 0.05, seed: int = 0) -> SampleSummary:
    _, correct, answers = _problem_matrix(records)
    return summarize_samples(correct, answers, ks, num_resamples=num_resamples, alpha=alpha, seed=seed)


def summarize_benchmarks(records: list[SampleRecord], ks: Sequence[int], *, num_resamples: int = 1000,
                         alpha: float = 0.05, seed: int = 0) -> dict:
    """Per benchmark and ``overall`` (all problems pooled): pass@k for k=1..n, maj@k for ``ks``, mean@n, with CIs;
    plus a breakdown by every group field found (pass@k for ``ks``). Also response-length and grading counts."""
    by_bench: dict[str, list[SampleRecord]] = defaultdict(list)
    for r in records:
        by_bench[r.benchmark].append(r)
    out: dict = {}
    for name, recs in list(by_bench.items()) + ([("overall", records)] if len(by_bench) > 1 else []):
        s = summarize_records(recs, ks, num_resamples=num_resamples, alpha=alpha, seed=seed)
        entry = _summary_dict(s)
        entry["response_tokens_mean"] = sum(r.num_tokens for r in recs) / len(recs)
        entry["truncated_rate"] = sum(r.finish_reason == "length" for r in recs) / len(recs)
        entry["grading"] = {st: sum(r.status == st for r in recs) for st in sorted({r.status for r in recs})}
        paths = [r for r in recs if r.longest_path_tokens is not None]
        if paths:  # DC-CoT: latency next to accuracy
            entry["longest_path_mean"] = sum(r.longest_path_tokens for r in paths) / len(paths)
            entry["total_tokens_mean"] = sum(r.total_tokens or 0 for r in paths) / len(paths)
            entry["format_valid_rate"] = sum(bool(r.format_valid) for r in paths) / len(paths)
        breakdown = {}
        for fld in sorted({f for r in recs for f in r.group}):
            parts: dict[str, list[SampleRecord]] = defaultdict(list)
            for r in recs:
                parts[r.group.get(fld, "?")].append(r)
            breakdown[fld] = {
                val: _summary_dict(summarize_records(rs, [], num_resamples=num_resamples, alpha=alpha, seed=seed), ks)
                for val, rs in sorted(parts.items())
            }
        if breakdown:
            entry["by"] = breakdown
        out[name] = entry
    return out


def _est(e: Estimate) -> dict[str, float]:
    return {"value": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high}


def _summary_dict(s: SampleSummary, only_ks: Sequence[int] | None = None) -> dict:
    keep = set(only_ks) if only_ks is not None else set(s.pass_at_k)
    return {
        "num_problems": s.num_problems,
        "n": s.num_samples,
        "pass@k": {str(k): _est(e) for k, e in s.pass_at_k.items() if k in keep},
        "maj@k": {str(k): _est(e) for k, e in s.maj_at_k.items()},
        "mean@n": _est(s.mean_at_n),
    }


def flat_metrics(summary: dict, ks: Sequence[int], prefix: str = "eval", with_ci: bool = True) -> dict[str, float]:
    """``summarize_benchmarks`` output -> ``{prefix}/<bench>/pass@k``, ``.../maj@k``, ``.../mean@n`` (n is the
    number), ``.../num_problems``, ``.../response_tokens_mean`` and, with ``with_ci``, ``..._ci_low/_ci_high``."""
    out: dict[str, float] = {}
    for bench, e in summary.items():
        base = f"{prefix}/{bench}"
        stats = [(f"pass@{k}", e["pass@k"][str(k)]) for k in ks] + [(f"maj@{k}", e["maj@k"][str(k)]) for k in ks]
        stats.append((f"mean@{e['n']}", e["mean@n"]))
        for name, est in stats:
            out[f"{base}/{name}"] = est["value"]
            if with_ci:
                out[f"{base}/{name}_ci_low"] = est["ci_low"]
                out[f"{base}/{name}_ci_high"] = est["ci_high"]
        out[f"{base}/num_problems"] = float(e["num_problems"])
        out[f"{base}/response_tokens_mean"] = float(e["response_tokens_mean"])
        for key in ("longest_path_mean", "total_tokens_mean", "format_valid_rate"):
            if key in e:
                out[f"{base}/{key}"] = float(e[key])
    return out


# ---------------------------------------------------------------------------------------------------- in training
def evaluate_benchmarks(
    generate_fn: GenerateFn,
    score_fn: ScoreFn,
    benchmarks: dict[str, list[PromptItem]],
    n: int,
    ks: Sequence[int] | None = None,
    *,
    prefix: str = "eval",
    with_ci: bool = True,
    num_resamples: int = 1000,
) -> dict[str, float]:
    """Validation during training: the same statistics as ``rl eval``, as flat metrics.

    generate_fn(items, n) -> [len(items)][n] rollouts (e.g. the driver's engine fan-out at the eval temperature);
    score_fn(items, groups) -> flat grading results in group-major order (the driver's reward pool);
    benchmarks: name -> formatted prompt items (see ``load_benchmark``).
    Returns ``{prefix}/<bench>/pass@k`` and ``maj@k`` for ``ks`` (default: powers of two up to n),
    ``mean@n``, CI bounds (``with_ci``), ``num_problems``, ``response_tokens_mean``; ``{prefix}/overall/...``
    pools all problems when there are several benchmarks; ``perf/eval_s`` is the wall time.
    """
    ks = check_ks(ks if ks is not None else default_ks(n), n)
    t0 = time.perf_counter()
    records: list[SampleRecord] = []
    for name, items in benchmarks.items():
        groups = generate_fn(items, n)
        if [len(g) for g in groups] != [n] * len(items):
            raise ValueError(f"generate_fn returned group sizes {[len(g) for g in groups][:8]}..., expected {n} each")
        records += make_records(name, items, groups, score_fn(items, groups))
    summary = summarize_benchmarks(records, ks, num_resamples=num_resamples)
    out = flat_metrics(summary, ks, prefix=prefix, with_ci=with_ci)
    out["perf/eval_s"] = time.perf_counter() - t0
    return out


def merge_throughput(previous: dict | None, this_run: dict) -> dict:
    """Generation totals over all runs into one output directory (``summary.json`` ``all_runs``): ``previous``
    is the summary already there (or None), ``this_run`` this run's ``engine_start_s``, ``generation_s`` and
    ``response_tokens``. A run that generated nothing (a resume of a finished evaluation) changes nothing."""
    prev = (previous or {}).get("all_runs")
    first = (previous or {}).get("this_run") or {}
    if prev is None and first.get("response_tokens"):  # a summary written before all_runs existed
        prev = {"runs": 1, **{k: first[k] for k in ("engine_start_s", "generation_s", "response_tokens")}}
    tot = dict(prev or {"runs": 0, "engine_start_s": 0.0, "generation_s": 0.0, "response_tokens": 0})
    if this_run["generation_s"] > 0:
        tot["runs"] += 1
        for k in ("engine_start_s", "generation_s", "response_tokens"):
            tot[k] += this_run[k]
    tot["tokens_per_s"] = tot["response_tokens"] / tot["generation_s"] if tot["generation_s"] else None
    return tot


# ---------------------------------------------------------------------------------------------------- outputs
def _pct(e: dict) -> str:
    return f"{100 * e['value']:.1f} [{100 * e['ci_low']:.1f}, {100 * e['ci_high']:.1f}]"


def markdown_table(results: dict, ks: Sequence[int]) -> str:
    """pass@k and maj@k (percent, with 95% bootstrap CIs over problems) per benchmark, then group breakdowns."""
    if not results:
        return "(no finished problems)"
    head = ["benchmark", "problems", "n"] + [f"pass@{k}" for k in ks] + [f"maj@{ks[-1]}", "mean@n", "resp. tokens"]
    dccot = any("longest_path_mean" in e for e in results.values())
    if dccot:
        head += ["longest path", "format ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bench, e in results.items():
        cells = [bench, str(e["num_problems"]), str(e["n"])] + [_pct(e["pass@k"][str(k)]) for k in ks]
        cells += [_pct(e["maj@k"][str(ks[-1])]), _pct(e["mean@n"]), f"{e['response_tokens_mean']:.0f}"]
        if dccot:
            cells += [f"{e.get('longest_path_mean', float('nan')):.0f}",
                      f"{100 * e.get('format_valid_rate', float('nan')):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for bench, e in results.items():
        for fld, parts in e.get("by", {}).items():
            if bench == "overall":
                continue
            lines += ["", f"{bench} by {fld}:", "",
                      "| " + " | ".join([fld, "problems"] + [f"pass@{k}" for k in ks]) + " |",
                      "|" + "---|" * (len(ks) + 2)]
            for val, p in parts.items():
                lines.append("| " + " | ".join([val, str(p["num_problems"])] + [_pct(p["pass@k"][str(k)]) for k in ks])
                             + " |")
    lines += ["", "Percent; [95% bootstrap CI over problems]. pass@k: unbiased estimator from n samples; maj@k: "
              "majority vote over the first k samples; mean@n: fraction of all samples correct."]
    if dccot:
        lines[-1] += (" DC-CoT: resp. tokens counts every token (director and all workers); longest path is the "
                      "latency measure (director + the longest worker of each spawn block); format ok: % of samples "
                      "in the director/worker grammar.")
    return "\n".join(lines)


def plot_pass_at_k(results: dict, out_png: Path) -> Path:
    """pass@k curves (k = 1..n, log-2 x axis), one line per benchmark, shaded 95% CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for bench, e in results.items():
        ks = sorted(int(k) for k in e["pass@k"])
        vals = [e["pass@k"][str(k)] for k in ks]
        style = "--" if bench == "overall" else "-"
        line, = ax.plot(ks, [v["value"] for v in vals], style, marker="o", ms=3, label=f"{bench} ({e['num_problems']})")
        ax.fill_between(ks, [v["ci_low"] for v in vals], [v["ci_high"] for v in vals], color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("pass@k (95% bootstrap CI over problems)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
