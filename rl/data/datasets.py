"""Loading prompt datasets: benchmark JSONL files by name or path, and the embedded arithmetic task.

Benchmark names resolve to ``<data_dir>/<name>.jsonl`` (aliases below); ``data_dir`` defaults to the env var
``RL_DATA_DIR``, else the ``shared/data`` folder beside the project checkout. Rows are ``{id, problem, answer,
...}`` with configurable field names; a malformed row either stops loading with its line number or is counted
and skipped (``on_bad_row``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rl.types import PromptItem

# The user message of a JSONL problem in training (data.*.prompt_template), in-training benchmarks and `rl eval`.
DEFAULT_PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."

ALIASES = {"gsm8k": "gsm8k_test", "math": "math500", "minerva": "minerva_math", "hmmt": "hmmt_feb25"}


def default_data_dir() -> Path:
    env = os.environ.get("RL_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "data"


def resolve_dataset(name_or_path: str, data_dir: str | Path | None = None) -> Path:
    """A path to an existing file, or a benchmark name looked up in ``data_dir``."""
    p = Path(name_or_path)
    if p.suffix in (".jsonl", ".json") and p.is_file():
        return p
    root = Path(data_dir) if data_dir else default_data_dir()
    stem = ALIASES.get(name_or_path, name_or_path)
    candidate = root / f"{stem}.jsonl"
    if candidate.is_file():
        return candidate
    known = sorted(f.stem for f in root.glob("*.jsonl")) if root.is_dir() else []
    raise ValueError(
        f"dataset '{name_or_path}' not found: not a file, and no {candidate}. "
        f"Known names in {root}: {', '.join(known) or '(none: set data.data_dir or RL_DATA_DIR)'}"
    )


@dataclass
class LoadReport:
    """What loading a file found: rows used and rows skipped, with the reason of each skip."""

    path: str
    num_loaded: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)


def load_jsonl_prompts(
    path: str | Path,
    *,
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str = "id",
    template: str = "{problem}",
    on_bad_row: str = "error",
    limit: int | None = None,
    format_prompt=None,
) -> tuple[list[PromptItem], LoadReport]:
    """Read prompts from a JSONL file. ``format_prompt(text) -> str`` overrides ``template`` (chat templates)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    report = LoadReport(str(path))
    items: list[PromptItem] = []
    seen: set[str] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not raw.strip():
                continue
            problem = _check_row(raw, lineno, problem_field, answer_field, id_field, seen)
            if isinstance(problem, str):
                if on_bad_row == "error":
                    raise ValueError(f"{path}:{lineno}: {problem} (set data.*.on_bad_row=skip to skip bad rows)")
                report.skipped.append((lineno, problem))
                continue
            row = problem
            rid = str(row.get(id_field, f"{path.stem}-{lineno}"))
            seen.add(rid)
            text = row[problem_field]
            prompt = format_prompt(text) if format_prompt else template.format(problem=text)
            meta = {k: v for k, v in row.items() if k not in (problem_field, answer_field, id_field)}
            items.append(PromptItem(id=rid, prompt=prompt, answer=str(row[answer_field]), metadata=meta))
    report.num_loaded = len(items)
    if not items:
        raise ValueError(f"{path}: no usable rows ({len(report.skipped)} skipped)")
    return items, report


def _check_row(raw: bytes, lineno: int, problem_field: str, answer_field: str, id_field: str, seen: set[str]):
    """The parsed row, or a string saying what is wrong with it."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not valid JSON ({e.__class__.__name__}: {e})"
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key in (problem_field, answer_field):
        if key not in row:
            return f"missing field '{key}' (fields present: {', '.join(row) or 'none'})"
    if not isinstance(row[problem_field], str) or not row[problem_field].strip():
        return f"field '{problem_field}' must be a non-empty string"
    if row[answer_field] is None or str(row[answer_field]).strip() == "":
        return f"field '{answer_field}' is empty"
    if id_field in row and str(row[id_field]) in seen:
        return f"duplicate id {row[id_field]!r}"
    return row


def load_dataset(ds_cfg, data_dir: str | None = None, tokenizer=None) -> tuple[list[PromptItem], LoadReport]:
    """Build the prompt list of one ``DatasetConfig`` (see ``rl.config``)."""
    if ds_cfg.kind == "arith":
        from rl.data.arith import make_arith_problems

        if ds_cfg.num_problems is None:
            raise ValueError("data.*.num_problems must be set for kind=arith")
        items = make_arith_problems(ds_cfg.num_problems, seed=ds_cfg.seed, split=ds_cfg.split)
        return items, LoadReport(f"arith:{ds_cfg.split}", num_loaded=len(items))
    if ds_cfg.kind == "dccot_sum":
        from rl.data.dccot_arith import make_sum_problems

        if ds_cfg.num_problems is None:
            raise ValueError("data.*.num_problems must be set for kind=dccot_sum")
        items = make_sum_problems(ds_cfg.num_problems, seed=ds_cfg.seed, split=ds_cfg.split)
        return items, LoadReport(f"dccot_sum:{ds_cfg.split}", num_loaded=len(items))
    if not ds_cfg.path:
        raise ValueError("data.*.path is required for kind=jsonl (a .jsonl path or a benchmark name like math500)")
    fmt = None
    if ds_cfg.use_chat_template:
        if tokenizer is None:
            raise ValueError("use_chat_template needs the model's tokenizer")
        template = ds_cfg.prompt_template or DEFAULT_PROMPT_TEMPLATE

        def fmt(text: str) -> str:
            msgs = [{"role": "user", "content": template.format(problem=text)}]
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    return load_jsonl_prompts(
        resolve_dataset(ds_cfg.path, data_dir),
        problem_field=ds_cfg.problem_field,
        answer_field=ds_cfg.answer_field,
        id_field=ds_cfg.id_field,
        template=ds_cfg.prompt_template or DEFAULT_PROMPT_TEMPLATE,
        on_bad_row=ds_cfg.on_bad_row,
        limit=ds_cfg.num_problems,
        format_prompt=fmt,
    )


class PromptSampler:
    """Epoch-wise shuffled order over a prompt list; its state (epoch, position) goes into checkpoints."""

    def __init__(self, items: list[PromptItem], seed: int) -> None:
        if not items:
            raise ValueError("no prompts to sample from")
        self.items = items
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        import random

        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[PromptItem]:
        out = []
        while len(out) < k:
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._permutation(self.epoch)
            out.append(self.items[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.pos = state["pos"]
        self._order = self._permutation(self.epoch)
