"""Summarize a run directory: the learning curve as a table and a PNG plot.

    python -m trainers.report runs/demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rl.tracking import read_metrics

COLUMNS = (
    ("step", "step", "{:>4d}"),
    ("reward/mean", "reward", "{:>7.3f}"),
    ("reward/accuracy", "train acc", "{:>9.3f}"),
    ("eval/accuracy", "held-out acc", "{:>12.3f}"),
    ("rollout/response_len_mean", "resp len", "{:>8.1f}"),
    ("loss/entropy", "entropy", "{:>7.3f}"),
    ("perf/step_s", "step s", "{:>6.1f}"),
)


MAX_ROWS = 40


def learning_curve_table(records: list[dict], max_rows: int = MAX_ROWS) -> str:
    """The curve as a table: every step when there are at most ``max_rows``, else every k-th step (k chosen to fit)
    plus every evaluated step and the last one, with a line saying so (metrics.jsonl holds them all)."""
    head = " | ".join(title for _, title, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    if len(records) > max_rows:
        every = -(-len(records) // max_rows)
        last = records[-1]["step"]
        records = [r for r in records if r["step"] % every == 0 or "eval/accuracy" in r or r["step"] == last]
        lines.insert(0, f"(one step in {every}, and each evaluated step; metrics.jsonl holds every step)")
    for rec in records:
        cells = []
        for key, title, fmt in COLUMNS:
            v = rec.get(key)
            cells.append(fmt.format(v) if v is not None else " " * len(title))
        lines.append(" | ".join(c.rjust(len(t)) for c, (_, t, _) in zip(cells, COLUMNS)))
    return "\n".join(lines)


def plot_run(records: list[dict], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [r for r in records if "reward/mean" in r]
    ev = [r for r in records if "eval/accuracy" in r]
    axes[0].plot([r["step"] for r in train], [r["reward/mean"] for r in train], label="train reward (mean)")
    axes[0].plot([r["step"] for r in ev], [r["eval/accuracy"] for r in ev], "o-", label="held-out accuracy")
    axes[0].set_xlabel("step")
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    axes[0].set_title("learning curve")
    axes[1].plot([r["step"] for r in train], [r.get("rollout/response_len_mean", 0) for r in train])
    axes[1].set_xlabel("step")
    axes[1].set_title("mean response length (tokens)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trainers.report RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    records = read_metrics(run_dir)
    if not records:
        print(f"no metrics in {run_dir / 'metrics.jsonl'}", file=sys.stderr)
        return 1
    print(learning_curve_table(records))
    png = plot_run(records, run_dir / "learning_curve.png")
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        if "eval_before" in s and "eval_after" in s:
            print(f"\nheld-out accuracy: {s['eval_before']:.3f} -> {s['eval_after']:.3f}")
    print(f"\noutputs in {run_dir}: metrics.jsonl, samples.jsonl, tb/ (TensorBoard), checkpoints/, {png.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
