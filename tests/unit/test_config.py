"""Config loading: strict keys with suggestions, overrides, validation with fix hints, every recipe loads."""

from pathlib import Path

import pytest
import yaml

from rl.config import ConfigError, dump_config, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.model.build_tiny and cfg.rollout.num_samples_per_prompt == 8


def _leaves(data: dict, prefix: tuple = ()):
    """(key path, value) of every non-mapping value in a nested mapping."""
    for k, v in data.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _same(got, written) -> bool:
    """A loaded value equals what the YAML wrote (YAML reads ``1e-6`` as text; list items may leave defaults out)."""
    if isinstance(got, list) and isinstance(written, list):
        return len(got) == len(written) and all(_same(g, w) for g, w in zip(got, written))
    if isinstance(got, dict) and isinstance(written, dict):
        return all(k in got and _same(got[k], w) for k, w in written.items())
    if isinstance(got, float) and not isinstance(written, bool):
        return got == float(written)
    return got == written


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    # every value the recipe sets is the loaded value (no key silently dropped or defaulted)
    dumped = cfg.model_dump(mode="json")
    for key, value in _leaves(yaml.safe_load(recipe.read_text()) or {}):
        got = dumped
        for part in key:
            got = got[part]
        assert _same(got, value), (key, got, value)
    from trainers.kinds import make_kind

    make_kind(cfg)  # the kind checks its own settings (an environment's name and options) when the run starts


def test_misspelled_key_names_nearest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  temperatur: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.temperatur'; did you mean 'rollout.temperature'"):
        load_config(p)


def test_misspelled_section_and_list_items():
    with pytest.raises(ConfigError, match="did you mean 'learner'"):
        load_config(None, ["lerner.lr=1"])
    with pytest.raises(ConfigError, match=r"rewards\[0\].wieght"):
        load_config(None, ["rewards=[{name: math_verify, wieght: 2}]"])


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "c=[1, 2]", "d=true", "e=x"]) == [("a.b", 1), ("c", [1, 2]), ("d", True), ("e", "x")]
    cfg = load_config(None, ["rollout.temperature=0.7", "run.num_steps=3"])
    assert cfg.rollout.temperature == 0.7 and cfg.run.num_steps == 3
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["rollout.temperature"])


def test_value_errors_name_the_field():
    with pytest.raises(ConfigError, match="rollout.temperature"):
        load_config(None, ["rollout.temperature=-1"])
    with pytest.raises(ConfigError, match="model.path is not set"):
        load_config(None, ["model.build_tiny=false"])


def test_async_mode_needs_disaggregated_placement():
    with pytest.raises(ConfigError, match="async_mode.enabled needs placement.mode=disaggregated"):
        load_config(None, ["async_mode.enabled=true", "placement.mode=colocated"])
    for recipe in ("configs/gdro_tiny_cpu.yaml", "configs/gigpo_tiny_cpu.yaml", "configs/dccot_tiny_cpu.yaml"):
        assert load_config(recipe, ["async_mode.enabled=true"]).async_mode.enabled


def test_batch_arithmetic_checked():
    with pytest.raises(ConfigError, match="mini_batches_per_step"):
        load_config(None, ["rollout.prompts_per_step=6", "learner.mini_batches_per_step=4"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["rollout.temperature=0.9"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_dtypes_master_compute_engine():
    """model.dtype is the compute dtype, learner.param_dtype the master copy (fp32 by default), rollout.dtype the
    engines' (None: model.dtype); the removed learner.fsdp.param_dtype says what to set instead."""
    cfg = load_config(ROOT / "configs" / "cluster_8gpu_qwen2.5_math_7b.yaml")
    assert (cfg.learner.param_dtype, cfg.model.dtype, cfg.rollout.dtype) == ("float32", "bfloat16", None)
    cpu = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    assert (cpu.learner.param_dtype, cpu.model.dtype, cpu.rollout.dtype) == ("float32", "float32", None)
    with pytest.raises(ConfigError, match=r"learner.fsdp.param_dtype=bfloat16 was removed: set model.dtype=bfloat16"):
        load_config(None, ["learner.fsdp.param_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="rollout.dtype"):
        load_config(None, ["rollout.dtype=int8"])


def test_config_changes_lists_every_changed_value_and_which_a_resume_may_change():
    from rl.config import config_changes, format_changes, resume_safe

    old = yaml.safe_load(dump_config(load_config(None, [])))
    new = yaml.safe_load(dump_config(load_config(None, ["run.num_steps=50", "learner.lr=3e-6", "ray.num_cpus=8",
                                                        "rewards=[{name: math_verify, weight: 2}]"])))
    changes = config_changes(old, new)
    assert changes == [("run.num_steps", 20, 50), ("learner.lr", 1e-5, 3e-6),
                       ("rewards", [{"name": "math_verify", "weight": 1.0, "kwargs": {}}],
                        [{"name": "math_verify", "weight": 2.0, "kwargs": {}}]),
                       ("ray.num_cpus", None, 8)]
    assert [resume_safe(k) for k, _, _ in changes] == [True, False, False, True]
    assert format_changes(changes[:2]).splitlines() == ["  run.num_steps: 20 -> 50",
                                                         "  learner.lr: 1e-05 -> 3e-06  (not resumable)"]
    assert config_changes({"a": {"b": 1}}, {"a": {"c": 1}}) == [("a.b", 1, "<absent>"), ("a.c", "<absent>", 1)]
    # a key added to the schema after the run started is no change while it keeps its default
    assert config_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}, {"a": {"b": 0, "c": 2}}) == []
    assert config_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": 3}}, {"a": {"b": 0, "c": 2}}) == [("a.c", "<absent>", 3)]
    assert not resume_safe("run.seed") and not resume_safe("rayx.y") and resume_safe("ray.address")
    assert all(map(resume_safe, ("rollout.num_engines", "rollout.enforce_eager", "rollout.engine_core")))
    assert not resume_safe("rollout.temperature") and not resume_safe("rollout.num_samples_per_prompt")


def _resume(tmp_path, monkeypatch, *overrides: str, allow: bool = False) -> int:
    """`rl train --resume` over a run directory whose config.yaml has the defaults; the model build and Ray are
    not reached (a resume the check lets through stops there)."""
    from trainers import job
    from trainers.cli import main

    class Reached(Exception):
        pass

    def stop(*args):
        raise Reached

    monkeypatch.setattr(job, "resolve_model", stop)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text(dump_config(load_config(None, [f"run.output_dir={run}"])))
    try:
        return main(["train", f"run.output_dir={run}", *overrides, "--resume", *(["--allow-config-change"] * allow)])
    except Reached:
        return -1


def test_resume_refuses_a_changed_recipe_and_shows_the_diff(tmp_path, monkeypatch, capsys):
    saved = (tmp_path / "run" / "config.yaml")
    assert _resume(tmp_path, monkeypatch, "algorithm.clip_eps_high=0.28", "run.num_steps=40") == 1
    err = capsys.readouterr().err
    assert f"--resume: this config differs from the run's {saved} in algorithm.clip_eps_high, which" in err
    assert "  run.num_steps: 20 -> 40\n  algorithm.clip_eps_high: 0.2 -> 0.28  (not resumable)\n" in err
    assert "--allow-config-change" in err
    assert yaml.safe_load(saved.read_text())["algorithm"]["clip_eps_high"] == 0.2  # not overwritten

    # safe keys only: shown, and the run goes on (to the model build, stubbed here)
    assert _resume(tmp_path, monkeypatch, "run.num_steps=40", "run.save_every_steps=5") == -1
    assert "[rl] --resume: config changes from" in capsys.readouterr().out
    assert yaml.safe_load(saved.read_text())["run"]["num_steps"] == 40
    # an unsafe change with --allow-config-change: shown, and the run goes on under the new values
    assert _resume(tmp_path, monkeypatch, "algorithm.clip_eps_high=0.28", allow=True) == -1
    assert "  algorithm.clip_eps_high: 0.2 -> 0.28  (not resumable)" in capsys.readouterr().out
    assert yaml.safe_load(saved.read_text())["algorithm"]["clip_eps_high"] == 0.28


def test_resume_accepts_a_run_written_before_a_key_existed(tmp_path, capsys):
    from trainers.preflight import check_resumed_config

    run = tmp_path / "run"
    run.mkdir()
    saved = yaml.safe_load(dump_config(load_config(None, [f"run.output_dir={run}"])))
    del saved["algorithm"]["clip_eps_high"]  # as if the run's code had no such key yet
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    check_resumed_config(load_config(None, [f"run.output_dir={run}"]), run, False)  # the default: no change
    assert capsys.readouterr().out == ""
    changed = load_config(None, [f"run.output_dir={run}", "algorithm.clip_eps_high=0.28"])
    with pytest.raises(ValueError, match=r"algorithm.clip_eps_high: \"<absent>\" -> 0.28  \(not resumable\)"):
        check_resumed_config(changed, run, False)


def test_every_recipes_written_config_loads_back_the_same(tmp_path):
    """A run's config.yaml (dump_config) is a config: `rl train runs/X/config.yaml` reproduces the run's settings."""
    import glob

    recipes = sorted(glob.glob(str(Path(__file__).resolve().parents[2] / "configs" / "*.yaml")))
    assert len(recipes) >= 20
    for recipe in recipes:
        cfg = load_config(recipe, [] if "tiny" in recipe else ["model.path=/models/m"])
        written = tmp_path / "config.yaml"
        written.write_text(dump_config(cfg))
        assert load_config(written).model_dump() == cfg.model_dump(), recipe


def test_a_run_from_before_the_eager_cpu_default_resumes_without_a_flag(tmp_path, monkeypatch, capsys):
    # runs started before rollout.enforce_eager defaulted to None wrote `enforce_eager: false` and no engine_core
    from trainers import job
    from trainers.cli import main

    def reached(*args):
        raise KeyboardInterrupt  # the model build: the resume check let the run through

    monkeypatch.setattr(job, "resolve_model", reached)
    run = tmp_path / "run"
    run.mkdir()
    saved = yaml.safe_load(dump_config(load_config(None, [f"run.output_dir={run}"])))
    saved["rollout"]["enforce_eager"] = False
    del saved["rollout"]["engine_core"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", f"run.output_dir={run}", "--resume"]) == 130
    assert "[rl] --resume: config changes from" in (out := capsys.readouterr().out)
    assert "  rollout.enforce_eager: false -> null\n" in out
