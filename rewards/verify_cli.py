"""``rl verify``: grade one response, or a JSONL file of responses, with the reward pool.

    rl verify --response 'so the answer is \\boxed{1/2}' --answer '0.5'
    rl verify --input samples.jsonl --output graded.jsonl [--response-field response --answer-field answer]
    rl verify --reward '{name: length_penalty, kwargs: {unit: tokens}}' --metadata '{"num_response_tokens": 812}' ...

Exit codes: single response: 0 correct, 1 not correct (wrong, unparsable, timeout or error);
file mode: 0 when every row was read, 1 when some rows were malformed (they are listed with their line
numbers and left out of the output); 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import IO, Iterator

from rl.types import RewardResult
from rewards.base import RewardRequest, RewardSpec
from rewards.pool import RewardPool

_CHUNK_ROWS = 256
_MAX_BAD_ROWS_SHOWN = 20


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rl verify",
        description="Grade responses against gold answers with the same reward pool training uses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    single = parser.add_argument_group("one response")
    single.add_argument("--response", help="response text ('-' reads it from stdin)")
    single.add_argument("--answer", help="gold answer, e.g. '\\frac{1}{2}' or '0.5'")
    single.add_argument("--prompt", default="", help="prompt text (only plug-ins look at it)")
    single.add_argument("--json", action="store_true", help="print the result as one JSON object")
    single.add_argument(
        "--metadata", default=None, metavar="JSON",
        help="metadata the rewards receive, as a JSON object, e.g. '{\"num_response_tokens\": 812, "
        "\"finish_reason\": \"stop\"}' (what a run sends: docs/rewards.md); in file mode, the defaults under "
        "each row's --metadata-field",
    )
    batch = parser.add_argument_group("a JSONL file")
    batch.add_argument("--input", help="JSONL file with one {response, answer} object per line")
    batch.add_argument("--output", help="JSONL file to write one result per graded row to")
    batch.add_argument("--response-field", default="response", help="field holding the response")
    batch.add_argument("--answer-field", default="answer", help="field holding the gold answer")
    batch.add_argument("--prompt-field", default="prompt", help="field holding the prompt (optional)")
    batch.add_argument("--metadata-field", default="metadata",
                       help="field holding the row's metadata object (optional; samples.jsonl rows of a run carry "
                       "num_response_tokens and finish_reason at the top level, and those are read too)")
    grading = parser.add_argument_group("grading")
    grading.add_argument(
        "--reward", action="append", default=None, metavar="SPEC",
        help="reward spec: a registered name, pkg.module:fn or path/file.py:fn, or a mapping as in a config, e.g. "
        "'{name: length_penalty, kwargs: {unit: tokens, max_length: 512}}'; repeatable; default math_verify",
    )
    grading.add_argument("--num-workers", type=int, default=2, help="grading worker processes")
    grading.add_argument("--timeout-s", type=float, default=5.0, help="wall-clock limit per response and reward")
    grading.add_argument("--audit-fraction", type=float, default=0.0, help="fraction of incorrect verdicts to audit")
    grading.add_argument("--audit-log", default=None, help="JSONL file for audit disagreements")
    return parser


def verify_main(argv: list[str] | None = None) -> int:
    """Entry point of ``rl verify``; returns the process exit code (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    single_mode = args.response is not None or args.answer is not None
    file_mode = args.input is not None or args.output is not None
    if single_mode == file_mode:
        parser.print_usage(sys.stderr)
        print("rl verify: give either --response and --answer, or --input and --output", file=sys.stderr)
        return 2
    if single_mode and (args.response is None or args.answer is None):
        print("rl verify: --response and --answer go together", file=sys.stderr)
        return 2
    if file_mode and (args.input is None or args.output is None):
        print("rl verify: --input and --output go together", file=sys.stderr)
        return 2
    try:
        specs = [parse_reward_spec(text) for text in (args.reward or ["math_verify"])]
        args.metadata = _parse_metadata(args.metadata)
        pool = RewardPool(
            specs,
            num_workers=args.num_workers,
            timeout_s=args.timeout_s,
            audit_fraction=args.audit_fraction,
            audit_log_path=args.audit_log,
        )
    except ValueError as exc:
        print(f"rl verify: {exc}", file=sys.stderr)
        return 2
    with pool:
        if single_mode:
            return _verify_one(pool, args)
        return _verify_file(pool, args)


def parse_reward_spec(text: str) -> RewardSpec:
    """``--reward``: a name (``math_verify``, ``pkg.module:fn``, ``path/file.py:fn``) or a YAML mapping with
    ``name`` and optional ``weight`` and ``kwargs``, as one entry of a config's ``rewards`` list."""
    if not text.lstrip().startswith("{"):
        return RewardSpec(text)
    import yaml

    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--reward {text!r} is not a valid mapping: {exc}") from None
    unknown = sorted(set(spec) - {"name", "weight", "kwargs"}) if isinstance(spec, dict) else []
    if not isinstance(spec, dict) or "name" not in spec or unknown:
        raise ValueError(f"--reward {text!r}: a mapping takes name (required), weight and kwargs"
                         + (f"; unknown key(s) {unknown}" if unknown else ""))
    return RewardSpec(name=str(spec["name"]), weight=float(spec.get("weight", 1.0)), kwargs=dict(spec.get("kwargs") or {}))


def _parse_metadata(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--metadata is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--metadata must be a JSON object, got {type(value).__name__}: {text!r}")
    return value


# Keys a run's samples.jsonl rows carry at the top level that rewards read from metadata (docs/rewards.md).
_ROW_METADATA_KEYS = ("prompt_id", "sample_index", "num_response_tokens", "finish_reason")


def _verify_one(pool: RewardPool, args: argparse.Namespace) -> int:
    response = sys.stdin.read() if args.response == "-" else args.response
    result = pool.score([RewardRequest(prompt=args.prompt, response=response, answer=args.answer,
                                       metadata=dict(args.metadata))])[0]
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"correct:   {result.correct}")
        print(f"score:     {result.score:g}")
        print(f"extracted: {result.extracted!r}")
        print(f"status:    {result.status}" + (f" ({result.error})" if result.error else ""))
        if len(result.components) > 1:
            print("components: " + ", ".join(f"{k}={v:g}" for k, v in result.components.items()))
        print(f"time:      {result.time_s * 1000:.1f} ms")
    return 0 if result.correct else 1


def _read_rows(handle: IO[str], args: argparse.Namespace, bad: list[tuple[int, str]]) -> Iterator[tuple[int, dict, RewardRequest]]:
    """Yield (line number, row, request) for good rows; append (line number, reason) to ``bad`` for others."""
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append((line_number, f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(row, dict):
            bad.append((line_number, f"expected a JSON object, got {type(row).__name__}"))
            continue
        fields = {}
        for key in (args.response_field, args.answer_field):
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key == args.answer_field:
                value = str(value)  # numeric gold answers are common in JSONL
            if not isinstance(value, str):
                problem = "missing" if key not in row else f"not a string ({type(value).__name__})"
                bad.append((line_number, f"field {key!r} {problem}; the row has {sorted(row)[:10]}"))
                break
            fields[key] = value
        else:
            own = row.get(args.metadata_field, {})
            if not isinstance(own, dict):
                bad.append((line_number, f"field {args.metadata_field!r} is not an object ({type(own).__name__})"))
                continue
            prompt = row.get(args.prompt_field, "")
            yield line_number, row, RewardRequest(
                prompt=prompt if isinstance(prompt, str) else "",
                response=fields[args.response_field],
                answer=fields[args.answer_field],
                metadata={**args.metadata, **{k: row[k] for k in _ROW_METADATA_KEYS if k in row}, **own},
            )


def _output_row(line_number: int, row: dict, result: RewardResult) -> dict:
    out = {"line": line_number}
    if "id" in row:
        out["id"] = row["id"]
    out.update(asdict(result))
    return out


def _verify_file(pool: RewardPool, args: argparse.Namespace) -> int:
    bad: list[tuple[int, str]] = []
    counts = {"ok": 0, "parse_fail": 0, "timeout": 0, "error": 0}
    graded = correct = 0
    start = time.perf_counter()
    try:
        source = open(args.input, encoding="utf-8", errors="replace")
    except OSError as exc:
        print(f"rl verify: cannot read --input {args.input!r}: {exc.strerror}", file=sys.stderr)
        return 2
    with source, open(args.output, "w", encoding="utf-8") as sink:
        chunk: list[tuple[int, dict, RewardRequest]] = []
        rows = _read_rows(source, args, bad)
        while True:
            chunk = [item for _, item in zip(range(_CHUNK_ROWS), rows)]
            if not chunk:
                break
            results = pool.score([request for _, _, request in chunk])
            for (line_number, row, _), result in zip(chunk, results):
                sink.write(json.dumps(_output_row(line_number, row, result)) + "\n")
                graded += 1
                correct += result.correct
                counts[result.status] += 1
    elapsed = time.perf_counter() - start
    metrics = pool.metrics()

    def pct(n: int) -> str:
        return f"{n} ({100.0 * n / max(graded, 1):.1f}%)"

    print(f"graded {graded} rows from {args.input} in {elapsed:.1f}s ({graded / max(elapsed, 1e-9):.1f}/s) -> {args.output}")
    print(f"  accuracy        {correct / max(graded, 1):.4f} ({correct}/{graded})")
    print(f"  parse failures  {pct(counts['parse_fail'])}")
    print(f"  timeouts        {pct(counts['timeout'])}")
    print(f"  errors          {pct(counts['error'])}")
    if args.audit_fraction > 0:
        print(f"  audit disagreements {int(metrics['reward/audit_disagreements'])}")
    if bad:
        print(f"  bad rows        {len(bad)} (not graded, not in the output)")
        for line_number, reason in bad[:_MAX_BAD_ROWS_SHOWN]:
            print(f"{args.input}:{line_number}: {reason}", file=sys.stderr)
        if len(bad) > _MAX_BAD_ROWS_SHOWN:
            print(f"... and {len(bad) - _MAX_BAD_ROWS_SHOWN} more bad rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(verify_main())
