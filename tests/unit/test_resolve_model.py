"""``model.build_tiny``: the embedded tiny model is built once into ``<run>/tiny_model``, with the arguments the
test suite's warm-model fixture uses (so the end-to-end test may hand the run that model instead of a second build)."""

from __future__ import annotations

import pytest

from rl.config import load_config
from trainers.job import resolve_model

pytestmark = pytest.mark.slow


def test_the_embedded_model_is_built_once_into_the_run(tmp_path, monkeypatch, capsys):
    import trainers.tiny_model as tiny

    real, calls = tiny.build_tiny_model, []

    def small_build(out, **kwargs):
        calls.append(kwargs)
        return real(out, **kwargs, sft_examples=64, sft_batch_size=8)

    monkeypatch.setattr(tiny, "build_tiny_model", small_build)
    cfg = load_config("configs/tiny_cpu.yaml", [f"run.output_dir={tmp_path}", "model.tiny.sft_steps=3"])
    path = resolve_model(cfg, tmp_path)
    assert path == str(tmp_path / "tiny_model") and (tmp_path / "tiny_model" / "model.safetensors").is_file()
    assert calls == [{"seed": 0, "eval_problems": 0, "sft_steps": 3}]
    assert not (tmp_path / "tiny_model.tmp").exists()
    out = capsys.readouterr().out
    assert f"[rl] building the embedded tiny arith model into {tmp_path / 'tiny_model'} ..." in out
    assert "3 warm-start steps" in out
    assert resolve_model(cfg, tmp_path) == path and len(calls) == 1  # found, not rebuilt


def test_the_recipe_builds_what_the_warm_model_fixture_builds(tmp_path, monkeypatch):
    import trainers.tiny_model as tiny

    calls = []

    def record(out, **kwargs):
        calls.append(kwargs)
        (out / "config.json").parent.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(tiny, "build_tiny_model", record)
    resolve_model(load_config("configs/tiny_cpu.yaml", [f"run.output_dir={tmp_path}"]), tmp_path)
    assert calls == [{"seed": 0, "eval_problems": 0}]  # tests/conftest.py: build_tiny_model(out, seed=0, eval_problems=0)
