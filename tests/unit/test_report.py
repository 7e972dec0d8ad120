"""``python -m trainers.report``'s table: every step of a short run; a long run thinned to fit, keeping the
evaluated steps and the last."""

from trainers.report import learning_curve_table


def _records(n: int, eval_every: int) -> list[dict]:
    return [{"step": s, "reward/mean": 0.5, **({"eval/accuracy": 0.3} if s % eval_every == 0 else {})}
            for s in range(n + 1)]


def _steps(table: str) -> list[int]:
    return [int(line.split("|")[0]) for line in table.splitlines() if line.split("|")[0].strip().isdigit()]


def test_short_run_shows_every_step():
    table = learning_curve_table(_records(30, 10))
    assert _steps(table) == list(range(31)) and "one step in" not in table


def test_long_run_is_thinned_keeping_evaluated_and_last_steps():
    table = learning_curve_table(_records(151, 30), max_rows=40)  # 152 records: one step in 4
    steps = _steps(table)
    assert table.splitlines()[0] == "(one step in 4, and each evaluated step; metrics.jsonl holds every step)"
    assert steps == sorted(set(range(0, 152, 4)) | {30, 90, 150, 151})
    assert len(steps) <= 40 + 6
