"""The plan as text: the summary, the memory table, errors, warnings and notes."""

from __future__ import annotations

from typing import Any

from rl.plan.base import ModelShape, _fmt_count, _size, _tokens


def format_plan(result: dict[str, Any], config_name: str | None = None) -> str:
    """The plan as text: model, placement, the batch in words, the memory table, errors, warnings, notes."""
    lines: list[str] = [f"rl plan: {config_name or '(defaults)'}"]
    add = lines.append
    m = result["model"]
    if m["shape"] is not None:
        s = ModelShape(**m["shape"])
        add(_wrap(f"model: {m['name']}, {_fmt_count(m['params'])} parameters ({s.describe()}; "
                  f"shape from {m['source']})", "  ", first=""))
    else:
        add(_wrap(f"model: {m['name']}, shape unknown ({m['source']})", "  ", first=""))
    add(_wrap(_describe_dtypes(m), "  ", first=""))
    pl = result["placement"]
    if pl["device"] == "gpu":
        cluster = f" of the cluster's {pl['cluster_gpus']}" if pl["cluster_gpus"] is not None else ""
        nodes = f" on {pl['nodes']} nodes" if pl.get("nodes") else ""
        add(f"placement: {pl['mode']} ({_describe_need_from(pl)}) -> {pl['total_gpus']} GPUs{cluster}{nodes}")
    else:
        add(f"placement: {pl['mode']}, CPU only")
    add("")
    add(_wrap(result["batch"]["summary"] + ".", "  ", first=""))
    mem = result["memory"]
    if mem is not None:
        add("")
        lines.extend(_memory_table(mem))
    for title, items in (("ERRORS", result["errors"]), ("warnings", result["warnings"])):
        if items:
            add("")
            add(f"{title}:")
            for it in items:
                add(_wrap(f"- [{it['key']}] {it['message']}", "  ", first=""))
    if result["notes"]:
        add("")
        add("notes:")
        for note in result["notes"]:
            add(_wrap(f"- {note}", "  ", first=""))
    add("")
    add("plan: " + ("OK" if result["ok"] else f"{len(result['errors'])} error(s)")
        + (f", {len(result['warnings'])} warning(s)" if result["warnings"] else ""))
    return "\n".join(lines)


def _describe_dtypes(m: dict[str, Any]) -> str:
    master, compute = m["master_dtype"], m["compute_dtype"]
    learner = (f"{master} parameters and AdamW state, computing in {compute}" if master == compute
               else f"{master} master weights and AdamW state, {compute} compute")
    return f"dtypes: learner {learner}; engines {m['engine_dtype']}"


def _describe_need_from(pl: dict[str, Any]) -> str:
    return f"learner {pl['learner_gpus']:g} GPUs, engines {pl['engine_gpus']:g} GPUs"


def _wrap(text: str, indent: str, first: str | None = None, width: int = 110) -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent=indent if first is None else first,
                         subsequent_indent=indent, break_on_hyphens=False)


def _memory_table(mem: dict[str, Any]) -> list[str]:
    lr, en = mem["learner"], mem["engine"]
    gpu = mem["device"] == "gpu"
    rows: list[tuple[str, str]] = []
    shard = f" (1/{lr['shards']} shard)" if lr["shards"] > 1 else ""
    where = "per GPU" if lr["context"] else "host RAM"
    rows.append((f"learner rank ({lr['strategy']}, log-prob kernel {lr['logprob_kernel']}), {where}", ""))
    master, compute = lr["master_dtype"], lr["compute_dtype"]
    ds = lr["strategy"] == "deepspeed"
    zero_masters = ds and master != compute  # ZeRO-3 keeps the fp32 masters beside its 16-bit module
    labels = (("parameters", f"parameters, {compute}" if zero_masters
               else f"parameters, {master}{' masters' if master != compute else ''}"),
              ("gradients", f"gradients, {'float32 partitions' if zero_masters else master}"),
              ("optimizer", f"AdamW state, {'float32 masters + ' if zero_masters else ''}{master} moments"),
              ("reference", f"reference policy, {compute}"))
    if lr.get("lora_params"):
        a = lr["lora_params"]
        labels = (("parameters", f"parameters: frozen base {compute} + LoRA adapters {master} ({a / 1e6:.1f}M)"),
                  ("gradients", f"gradients, adapters only, {master}"),
                  ("optimizer", f"AdamW state, adapters only, {master} moments"),
                  ("reference", f"reference policy, {compute}"))
    for key, label in labels:
        if key == "reference" and not lr["reference_policy"]:
            continue
        rows.append((f"  {label}{shard}", "in host RAM" if lr["cpu_offload"] and not lr[key] else _size(lr[key])))
    if lr["offloaded_to_host"]:
        rows.append(("  (host RAM, offloaded)", _size(lr["offloaded_to_host"])))
    if lr["strategy"] in ("fsdp2", "deepspeed"):
        rows.append((f"  gathered units + their gradients ({compute})", _size(lr["gathered"])))
    elif lr["gathered"]:
        rows.append((f"  {compute} compute copies (autocast)", _size(lr["gathered"])))
    rows.append(("  activations of one micro-batch", _size(lr["activations"])))
    rows.append(("  log-prob peak", _size(lr["logprob"])))
    if lr["drafter"]:
        rows.append(("  drafter replica (fp32, AdamW, embedding + head)", _size(lr["drafter"])))
        rows.append(("  drafter training step (engines generating)", _size(lr["drafter_work"])))
        rows.append(("  (host RAM, drafter buffer)", _size(lr["drafter_buffer_host"])))
    if lr["context"]:
        rows.append(("  CUDA context", _size(lr["context"])))
    rows.append(("  train peak", _size(lr["train_peak"])))
    if lr["load"] > lr["resident"]:
        rows.append(("  at load (whole model on the device)", _size(lr["load"])))
    rows.append(("  resident between updates", _size(lr["resident"])))
    if lr["drafter"]:
        rows.append(("  while the engines generate", _size(lr["generating"])))
    tp = f", TP {en['tensor_parallel_size']}" if en["tensor_parallel_size"] > 1 else ""
    rows.append((f"engine ({en['dtype']} weights{tp}), {'per GPU' if en.get('awake') is not None else 'host RAM'}",
                 ""))
    rows.append(("  weights", _size(en["weights"])))
    if en.get("lora_slots"):
        rows.append(("  LoRA slots (1 adapter of max_lora_rank, every projection)", _size(en["lora_slots"])))
    if en.get("awake") is not None:
        rows.append(("  gpu_memory_utilization share", _size(en["budget"])))
        rows.append(("  KV cache", _size(en["kv_cache"])))
    elif en.get("budget") is not None:
        rows.append(("  reserve (gpu_memory_utilization x host RAM)", _size(en["budget"])))
        rows.append(("  KV cache", _size(en["kv_cache"])))
    else:
        rows.append(("  KV cache", "gpu_memory_utilization x host RAM (give --host-memory-gib)"))
    if en.get("kv_tokens") is not None:
        held = f"{_tokens(en['kv_tokens'])} / {_tokens(en['concurrent_need_tokens'])}"
        rows.append(("  KV tokens held / a round's need", held))
    if gpu:
        ph = mem.get("colocated_phases")
        if ph:
            rows.append(("colocated GPU while training (engine asleep)", _size(ph["training"])))
            rows.append(("colocated GPU while generating", _size(ph["generating"])))
        for where, peak in mem["per_gpu_peak"].items():
            rows.append((f"PEAK, {where}", f"{_size(peak)} of {mem['gpu_memory_gib']:g} GiB"))
    else:
        rows.append(("host RAM per learner rank", _size(mem["host"]["per_learner_rank"])))
    width = max(len(a) for a, _ in rows) + 2
    out = ["memory estimate (formulas: rl/plan/__init__.py, docs/cluster.md)"]
    out += [f"  {a.ljust(width)}{b}".rstrip() for a, b in rows]
    return out
