"""Each algorithm's recipe on the tiny task over several seeds: the end value and 95% interval of held-out mean@4
and pass@4, and each algorithm's own mechanism metric, as a markdown table and a plot.

    python -m benchmarks.algorithms_sweep --seeds 0 1 2                 # every algorithm, 30 steps each
    python -m benchmarks.algorithms_sweep --only demo --seeds 0 1 2     # the demo recipe (scripts/demo.sh)
    python -m benchmarks.algorithms_sweep --only gigpo gigpo_omega0     # GiGPO against episode-level GRPO

Every run is `rl train <recipe> run.seed=<seed>` into ``<out>/<name>/seed<seed>`` from one warm-started tiny model
(built once into ``<out>/tiny_model``, or ``--model``; GiGPO's recipes start from the `number_target` model, built
by their first run and kept in ``<out>/tiny_model_number_target``). Resumable: a finished run (its ``summary.json``) is read, a
run with a checkpoint goes on with ``--resume``, anything else starts over. Each run's console is in its
``console.txt``. The seed moves the data order and the sampling seeds; the model is the same for all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rl.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    config: str
    overrides: tuple[str, ...] = ()
    mechanism: tuple[str, ...] = ()  # metrics averaged over the run's steps
    note: str = ""
    tiny_task: str = "arith"  # the embedded model it starts from (others: built by the recipe's first run)


MINI4 = ("learner.mini_batches_per_step=4",)
RECIPES: dict[str, Recipe] = {
    "grpo": Recipe("configs/tiny_cpu.yaml", (), ("rollout/groups_all_equal_frac",),
                   "share of groups with no signal"),
    "dr_grpo": Recipe("configs/tiny_cpu.yaml", ("algorithm.norm_adv_by_std=false",
                                                "algorithm.loss_agg_mode=seq-mean-token-sum-norm",
                                                "algorithm.loss_agg_const_len=24"),
                      ("rollout/response_len_mean",), "no std normalization, constant-length aggregation"),
    "rloo": Recipe("configs/tiny_cpu.yaml", ("algorithm.advantage_estimator=rloo",),
                   ("rollout/advantage_abs_mean",), "leave-one-out baseline"),
    "gspo": Recipe("configs/tiny_cpu.yaml", ("algorithm.policy_loss=gspo", "algorithm.clip_eps_low=3e-4",
                                             "algorithm.clip_eps_high=4e-4",
                                             "algorithm.loss_agg_mode=seq-mean-token-mean", *MINI4),
                   ("loss/clip_frac",), "sequence-ratio clip, 4 mini-batches per step"),
    "dapo": Recipe("configs/dapo_tiny_cpu.yaml", (), ("dapo/filtered_group_frac", "dapo/gen_rounds", "loss/clip_frac"),
                   "dynamic sampling: filtered share, generation rounds"),
    "sapo": Recipe("configs/sapo_tiny_cpu.yaml", (), ("loss/gate_mean", "loss/ratio_mean"),
                   "soft gate, 4 mini-batches per step"),
    "ds": Recipe("configs/ds_tiny_cpu.yaml", (), ("ds/term_to_adv_ratio",),
                 "differential smoothing: pass@4 against GRPO's"),
    "gdro": Recipe("configs/gdro_tiny_cpu.yaml", (), ("gdro/prompt/weight_bin0", "gdro/prompt/weight_bin4"),
                   "Prompt-GDRO weights of the hardest (0) and easiest (4) bins"),
    "cispo": Recipe("configs/tiny_cpu.yaml", ("algorithm.policy_loss=cispo", *MINI4), ("loss/clip_frac",),
                    "clipped detached importance weight, 4 mini-batches per step"),
    "gigpo": Recipe("configs/gigpo_tiny_cpu.yaml", (), ("gigpo/step_adv_share", "rollout/invalid_action_frac"),
                    "number_target: step-level share of the advantage", tiny_task="number_target"),
    "gigpo_omega0": Recipe("configs/gigpo_tiny_cpu.yaml", ("kind.gigpo.omega=0",), ("rollout/invalid_action_frac",),
                           "number_target, episode-level GRPO (omega 0)", tiny_task="number_target"),
    "lora": Recipe("configs/lora_tiny_cpu.yaml", (), ("loss/grad_norm",), "rank-8 adapters, lr 2e-3"),
    "demo": Recipe("configs/demo_tiny_cpu.yaml", (), ("dapo/filtered_group_frac",), "scripts/demo.sh's recipe"),
}
ALGORITHMS = [name for name in RECIPES if name not in ("demo", "gigpo", "gigpo_omega0", "lora")]

# two-sided 95% Student t quantiles by degrees of freedom (1..10); beyond that the normal's 1.96 is close enough
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for a single value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def run_one(name: str, recipe: Recipe, seed: int, out: Path, model: Path, steps: int | None,
            extra: tuple[str, ...] = ()) -> Path:
    run = out / name / f"seed{seed}"
    if (run / "summary.json").is_file():
        return run
    resume = any((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else False
    if not resume:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
    if recipe.tiny_task == "arith":
        model_args = [f"model.path={model}", "model.build_tiny=false"]
    else:  # the recipe builds its own task's model into its run once; the other runs start from a copy of it
        model_args, shared = [], out / f"tiny_model_{recipe.tiny_task}"
        if (shared / "config.json").is_file() and not (run / "tiny_model").exists():
            shutil.copytree(shared, run / "tiny_model")
    args = [sys.executable, "-m", "trainers.cli", "train", recipe.config, f"run.output_dir={run}", *model_args,
            f"run.seed={seed}", "run.progress=false",
            *recipe.overrides, *([f"run.num_steps={steps}"] if steps else []), *extra,
            *(["--resume"] if resume else [])]
    with open(run / "console.txt", "a") as console:
        rc = subprocess.call(args, cwd=ROOT, stdout=console, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if rc != 0:
        raise SystemExit(f"{name} seed {seed} failed (exit {rc}): see {run / 'console.txt'}")
    if recipe.tiny_task != "arith" and not (out / f"tiny_model_{recipe.tiny_task}" / "config.json").is_file():
        shutil.copytree(run / "tiny_model", out / f"tiny_model_{recipe.tiny_task}")
    return run


def summarize(name: str, recipe: Recipe, runs: list[Path]) -> dict:
    ends, passes, starts, hard, mech = [], [], [], [], {k: [] for k in recipe.mechanism}
    curves = []
    for run in runs:
        rows = read_metrics(run)
        ev = [r for r in rows if "eval/accuracy" in r]
        starts.append(ev[0]["eval/accuracy"])
        ends.append(ev[-1]["eval/accuracy"])
        passes.append(ev[-1].get("eval/pass@4", float("nan")))
        hard.append(ev[-1].get("eval/hard_accuracy", float("nan")))  # on the problems unsolved at step 0
        curves.append([(r["step"], r["eval/accuracy"]) for r in ev])
        for k in recipe.mechanism:
            vals = [r[k] for r in rows if k in r and r["step"] > 0]
            mech[k].append(sum(vals) / len(vals) if vals else float("nan"))
    gains = [e - s for s, e in zip(starts, ends)]
    return {"name": name, "seeds": len(runs), "start": mean_interval(starts), "end": mean_interval(ends),
            "gain": mean_interval(gains), "gains": gains, "pass@4": mean_interval(passes),
            "hard": mean_interval(hard),
            "mechanism": {k: mean_interval(v) for k, v in mech.items()}, "note": recipe.note, "curves": curves}


def _fmt(mi: tuple[float, float], digits: int = 3) -> str:
    return f"{mi[0]:.{digits}f} ± {mi[1]:.{digits}f}"


def markdown_table(results: list[dict]) -> str:
    lines = ["| recipe | seeds | held-out accuracy: start -> end | gain | pass@4 at end | on the problems unsolved at "
             "step 0, at end | its mechanism (mean over steps) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        mech = "; ".join(f"`{k}` {_fmt(v)}" for k, v in r["mechanism"].items())
        lines.append(f"| {r['name']} | {r['seeds']} | {r['start'][0]:.3f} -> {_fmt(r['end'])} | {_fmt(r['gain'])} "
                     f"| {_fmt(r['pass@4'])} | {_fmt(r['hard'])} | {mech} ({r['note']}) |")
    lines.append("")
    lines.append("Held-out accuracy is the recipe's `eval/accuracy` (single-turn recipes: mean@4 at T=1; GiGPO: greedy "
                 "success over the eval episodes). ± is the half-width of the 95% Student t interval over the seeds; "
                 "nan: a run without that metric.")
    return "\n".join(lines)


def plot(results: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for r in results:
        steps = [s for s, _ in r["curves"][0]]
        per_step = list(zip(*[[a for _, a in c] for c in r["curves"]]))
        mi = [mean_interval(list(v)) for v in per_step]
        line, = axes[0].plot(steps, [m for m, _ in mi], "o-", label=r["name"], markersize=3)
        axes[0].fill_between(steps, [m - h for m, h in mi], [m + h for m, h in mi], alpha=0.15,
                             color=line.get_color())
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("held-out accuracy (eval/accuracy)")
    axes[0].set_title("held-out accuracy (mean over seeds, 95% interval)")
    axes[0].legend(fontsize=8, ncol=2)
    names = [r["name"] for r in results]
    axes[1].bar(names, [r["gain"][0] for r in results], yerr=[r["gain"][1] for r in results], capsize=4)
    axes[1].set_ylabel("gain in held-out accuracy")
    axes[1].set_title("end minus start (95% interval over seeds)")
    axes[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "algorithms_sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="recipes to run (default: every algorithm)")
    p.add_argument("--steps", type=int, help="override each recipe's run.num_steps")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run (after the recipe's own), e.g. learner.lr=4e-3")
    p.add_argument("--model", type=Path, help="a built tiny model to start from (default: build one into --out)")
    p.add_argument("--plot", type=Path, help="write the plot here (default: <out>/sweep.png)")
    args = p.parse_args(argv)
    names = args.only or ALGORITHMS
    if len(args.seeds) < 2:
        p.error("--seeds: give at least 2 seeds (an interval needs them)")
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = args.out / "tiny_model"
        if not (model / "config.json").is_file():
            print(f"[sweep] building the tiny model into {model}", flush=True)
            subprocess.check_call([sys.executable, "-m", "trainers.tiny_model", str(model), "--eval-problems", "0"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL)
    elif not (model / "config.json").is_file():
        p.error(f"--model {model}: no config.json there (a transformers model directory is needed)")

    from tqdm import tqdm

    jobs = [(n, s) for n in names for s in args.seeds]
    runs: dict[str, list[Path]] = {n: [] for n in names}
    t0 = time.monotonic()
    with tqdm(jobs, desc="runs", unit="run") as bar:
        for name, seed in bar:
            bar.set_postfix_str(f"{name} seed {seed}")
            runs[name].append(run_one(name, RECIPES[name], seed, args.out, model, args.steps, tuple(args.set)))
    results = [summarize(n, RECIPES[n], runs[n]) for n in names]
    table = markdown_table(results)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "curves"} for r in results],
                                                      indent=2))
    out_png = args.plot or args.out / "sweep.png"
    plot(results, out_png)
    print(table)
    print(f"[sweep] {len(jobs)} runs in {time.monotonic() - t0:.0f} s; table {args.out / 'table.md'}, plot {out_png}")


if __name__ == "__main__":
    main()
