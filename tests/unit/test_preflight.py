"""A config that names files which are not there fails in seconds, before the tiny model's build or Ray."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.config import load_config
from trainers.preflight import preflight

ROOT = Path(__file__).resolve().parents[2]


def test_every_missing_thing_is_named_at_once(tmp_path):
    cfg = load_config("configs/tiny_cpu.yaml", [
        f"model.path={tmp_path / 'no_model'}", "data.train.kind=jsonl", f"data.train.path={tmp_path / 'x.jsonl'}",
        f"data.data_dir={tmp_path}",
        "rewards=[{name: math_verify}, {name: 'plugins/missing.py:score'}]",
    ])
    with pytest.raises(ValueError) as err:
        preflight(cfg)
    text = str(err.value)
    assert text.count("\n  - ") == 3
    assert "model.path=" in text and "data.train.path: dataset" in text
    assert "rewards[1]: reward spec 'plugins/missing.py:score': file 'plugins/missing.py' not found" in text
    preflight(load_config("configs/tiny_cpu.yaml"))  # the shipped recipe passes


def test_rl_train_stops_before_building_anything(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainers.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={out}",
                           "data.train.kind=jsonl", "data.train.path=missing_file.jsonl", f"data.data_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "data.train.path: dataset 'missing_file.jsonl' not found" in proc.stderr
    assert not (out / "tiny_model").exists() and time.perf_counter() - t0 < 60


def test_benchmarks_and_tracker_packages_are_checked(tmp_path, monkeypatch):
    import rl.tracking

    cfg = load_config("configs/tiny_cpu.yaml", [
        f"data.data_dir={tmp_path}", "eval.benchmarks=[arith, no_such_bench]", "run.trackers=[jsonl,wandb,mlflow]"])
    monkeypatch.setattr(rl.tracking, "_PACKAGES", {**rl.tracking._PACKAGES, "mlflow": "no_such_package_here"})
    with pytest.raises(ValueError) as err:
        preflight(cfg)
    text = str(err.value)
    assert text.count("\n  - ") == 2  # the built-in arith benchmark and the installed wandb pass
    assert "eval.benchmarks[1]: dataset 'no_such_bench' not found" in text
    assert "run.trackers: mlflow is listed but its package is not installed" in text


def test_jsonl_only_keys_are_refused_for_the_embedded_tasks():
    from rl.config import ConfigError

    with pytest.raises(ConfigError, match="prompt_template only apply to kind=jsonl; kind=arith builds its own"):
        load_config("configs/tiny_cpu.yaml", ["data.train.prompt_template='Q: {problem}'"])
    cfg = load_config("configs/tiny_cpu.yaml")
    assert cfg.data.train.prompt_template is None  # the resolved config shows no template the task does not use


def _heavy_work_forbidden(monkeypatch):
    """The model build and Ray must not start: the check has to come first."""
    from trainers import job

    def forbidden(*args):
        raise AssertionError("heavy work started before the data was checked")

    monkeypatch.setattr(job, "resolve_model", forbidden)
    monkeypatch.setattr(job, "start_local_or_attach", forbidden)


@pytest.mark.parametrize(("row", "problem"), [
    ('{"id": "b", "problem": "Compute 1 + 1."', "not valid JSON (JSONDecodeError: Expecting ',' delimiter"),
    ('{"id": "b", "question": "Compute 1 + 1.", "answer": "2"}', "missing field 'problem' (fields present: id, "
                                                                 "question, answer)"),
    ('{"id": "a", "problem": "Compute 1 + 2.", "answer": "3"}', "duplicate id 'a'"),
    ('{"id": "b", "problem": "Compute 1 + 1.", "answer": ""}', "field 'answer' is empty"),
    ('["Compute 1 + 1.", "2"]', "expected a JSON object, got list"),
])
def test_rl_train_names_a_malformed_row_before_heavy_work(tmp_path, monkeypatch, capsys, row, problem):
    from trainers.cli import main

    _heavy_work_forbidden(monkeypatch)
    data = tmp_path / "train.jsonl"
    rows = [f'{{"id": "{c}", "problem": "Compute 2 + {i}.", "answer": "{2 + i}"}}' for i, c in enumerate("acd")]
    data.write_text("\n".join(rows[:2] + [row] + rows[2:]) + "\n")
    assert main(["train", f"run.output_dir={tmp_path / 'run'}", "data.train.kind=jsonl",
                 f"data.train.path={data}"]) == 1
    err = capsys.readouterr().err
    assert f"data.train: {data}:3: {problem}" in err, err
    assert "on_bad_row=skip" in err


def test_on_bad_row_skip_lets_the_run_go_on(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "a", "problem": "Compute 2 + 0.", "answer": "2"}\nnot json\n')
    preflight(load_config(None, ["data.train.kind=jsonl", f"data.train.path={data}", "data.train.on_bad_row=skip"]))
