"""Benchmarks for evaluation: names and paths parsed into specs, problems loaded (JSONL, Parquet, the built-in
arith set) with formatted prompts, model directories resolved, and prompt lengths checked against the context."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rl.data.datasets import DEFAULT_PROMPT_TEMPLATE, LoadReport, _check_row, load_jsonl_prompts, resolve_dataset
from rl.registry import Registry
from rl.types import PromptItem


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


BUILTIN_BENCHMARKS: Registry = Registry("built-in benchmark")
"""Benchmarks generated in code, not read from files: name -> ``loader(limit) -> items`` (prompts as in training;
a larger limit extends a smaller one)."""


@BUILTIN_BENCHMARKS.register("arith")
def _arith_benchmark(limit: int | None) -> list[PromptItem]:
    from rl.data.arith import make_arith_problems

    # a longer list with the same seed extends a shorter one, so --limit N is a prefix of the same stream
    return make_arith_problems(limit or ARITH_EVAL_PROBLEMS, seed=ARITH_EVAL_SEED, split="test")




def load_benchmark(spec: BenchmarkSpec, format_prompt: Callable[[str], str], data_dir: str | None = None,
                   on_bad_row: str = "error") -> tuple[list[PromptItem], LoadReport]:
    """Problems of one benchmark with formatted prompts; a malformed row stops with its line (row) number, or is
    skipped and counted with ``on_bad_row="skip"``. A built-in benchmark (``BUILTIN_BENCHMARKS``) keeps the
    prompts its task was trained on, so ``format_prompt`` does not apply to it."""
    if spec.path in BUILTIN_BENCHMARKS:
        items = BUILTIN_BENCHMARKS.get(spec.path)(spec.limit)
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
