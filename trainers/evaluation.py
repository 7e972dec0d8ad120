"""Evaluation on math benchmarks: n samples per problem, graded, summarized as pass@k / maj@k / mean@n with CIs.

Two entry points share one code path (``generate -> grade -> records -> summarize``):

* ``evaluate_benchmarks(generate_fn, score_fn, benchmarks, n)``: in-training validation; returns flat metrics
  ``eval/<bench>/pass@k``, ``eval/<bench>/maj@k``, ``eval/<bench>/mean@n`` (+ CI bounds).
* ``run_eval(EvalSettings)``: ``rl eval``; starts vLLM engine actors in Ray (data-parallel), writes every graded
  generation to ``generations.jsonl`` after each finished chunk (append + fsync, so a crash loses nothing
  finished and a re-run resumes), then ``summary.json``, ``summary.md`` and ``pass_at_k.png``.

Statistics and the report are in :mod:`rl.eval_stats` (formulas: ``docs/algorithms.md`` "pass@k, mean@k,
maj@k"), benchmark loading in :mod:`rl.data.benchmarks`, GGUF conversion in :mod:`rl.gguf` (all re-exported here).
This is a shell module: it may import ``rollout`` and ``rewards``; it does I/O.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

# re-exported: trainers.evaluation is the API of evaluation
from rl.data.benchmarks import (  # noqa: F401
    ARITH_EVAL_PROBLEMS, ARITH_EVAL_SEED, BUILTIN_BENCHMARKS, BenchmarkSpec, LongPrompt, check_prompt_lengths,
    load_benchmark, make_prompt_formatter, model_context_len, parse_benchmarks, resolve_model_dir,
)
from rl.data.datasets import DEFAULT_PROMPT_TEMPLATE
from rl.eval_stats import (  # noqa: F401
    GROUP_FIELDS, GenerateFn, SampleRecord, ScoreFn, check_ks, default_ks, evaluate_benchmarks, flat_metrics,
    make_records, markdown_table, merge_throughput, plot_pass_at_k, summarize_benchmarks, summarize_records,
)
from rl.gguf import convert_gguf  # noqa: F401
from rl.ray_init import start_ray
from rl.round_robin import interleave
from rl.seeding import stable_seed
from rl.types import PromptItem

GENERATIONS_FILE = "generations.jsonl"
SETTINGS_FILE = "eval_settings.json"
# Settings that change what a generation is; a resumed run must match them.
_RESUME_KEYS = ("model", "n", "temperature", "top_p", "max_tokens", "seed", "prompt_template", "system_prompt",
                "chat_template", "dccot", "adapter")


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
    adapter: str | None = None  # a LoRA adapter directory (a model.lora checkpoint's adapter/): served on --model
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


def read_adapter(directory: str) -> tuple[dict[str, bytes], int]:
    """``rl eval --adapter``: the adapter's files (``adapter_config.json``, ``adapter_model.safetensors``) and the
    ``max_lora_rank`` its engines start with (the smallest vLLM accepts that holds its rank); a ValueError naming
    what is missing, before any engine starts."""
    from rl.config import LORA_ENGINE_RANKS

    d = Path(directory)
    names = ("adapter_config.json", "adapter_model.safetensors")
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise ValueError(f"--adapter {directory}: no {', '.join(missing)} there; give a LoRA adapter directory "
                         "(a model.lora checkpoint's adapter/, or peft's save_pretrained output)")
    rank = int(json.loads((d / names[0]).read_text()).get("r", 0))
    fits = [r for r in LORA_ENGINE_RANKS if r >= rank]
    if rank < 1 or not fits:
        raise ValueError(f"--adapter {directory}: rank r={rank} in adapter_config.json; vLLM serves ranks 1 to "
                         f"{LORA_ENGINE_RANKS[-1]}")
    return {n: (d / n).read_bytes() for n in names}, fits[0]


def _start_engines(settings: EvalSettings, model_dir: Path, max_model_len: int,
                   adapter: tuple[dict[str, bytes], int] | None = None) -> list:
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
                          tensor_parallel_size=tp, max_lora_rank=adapter[1] if adapter else None)
               for i in range(num)]
    t0 = time.perf_counter()
    ray.get([e.ping.remote() for e in engines])
    if adapter is not None:  # every generation then runs through it (Engine.load_adapter)
        files = ray.put(adapter[0])
        ray.get([e.load_adapter.remote(files, 0) for e in engines])
        print(f"[eval] serving the LoRA adapter {settings.adapter} on {model_dir}", flush=True)
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
    adapter = read_adapter(settings.adapter) if settings.adapter else None
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
        engines = _start_engines(settings, model_dir, max_model_len, adapter)
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
