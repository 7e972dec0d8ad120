"""benchmarks/algorithms_sweep.py: the interval over seeds by hand, the summary of finished runs, and the recipes
it names exist and load."""

import json
import math

import pytest

from benchmarks.algorithms_sweep import RECIPES, mean_interval, markdown_table, summarize
from rl.config import load_config


def test_mean_interval_is_the_student_t_95_interval():
    m, h = mean_interval([0.2, 0.3, 0.4])  # sd 0.1, t(2) = 4.303
    assert m == pytest.approx(0.3) and h == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert mean_interval([0.5]) == (0.5, 0.0)
    m, h = mean_interval([1.0, 3.0])  # sd sqrt(2), t(1) = 12.706
    assert m == 2.0 and h == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))


def test_summary_of_finished_runs(tmp_path):
    runs = []
    for seed, (start, end) in enumerate([(0.2, 0.5), (0.22, 0.46)]):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        rows = [{"step": 0, "eval/accuracy": start, "eval/pass@4": 0.5},
                {"step": 1, "reward/mean": 0.3, "dapo/filtered_group_frac": 0.2 + seed * 0.2},
                {"step": 2, "reward/mean": 0.3, "dapo/filtered_group_frac": 0.4, "eval/accuracy": end,
                 "eval/pass@4": 0.7 + seed * 0.1, "eval/hard_accuracy": 0.1 + seed * 0.1}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    r = summarize("demo", RECIPES["demo"], runs)
    assert r["gains"] == pytest.approx([0.3, 0.24])
    assert r["gain"][0] == pytest.approx(0.27) and r["gain"][1] == pytest.approx(12.706 * 0.03, rel=1e-3)
    assert r["end"][0] == pytest.approx(0.48) and r["pass@4"][0] == pytest.approx(0.75)
    assert r["hard"][0] == pytest.approx(0.15)
    assert r["mechanism"]["dapo/filtered_group_frac"][0] == pytest.approx((0.3 + 0.4) / 2)  # per-run means
    assert r["curves"][1] == [(0, 0.22), (2, 0.46)]
    table = markdown_table([r])
    assert "| demo | 2 | 0.210 -> 0.480 ± " in table and "| 0.150 ± 0.635 |" in table and "`dapo/filtered_group_frac` 0.350 ± " in table


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_loads_with_its_overrides(name):
    recipe = RECIPES[name]
    cfg = load_config(recipe.config, [*recipe.overrides, "run.seed=1"])
    assert cfg.run.seed == 1
