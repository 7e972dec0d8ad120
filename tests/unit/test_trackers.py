"""run.trackers: metrics, name, tags and the resolved config reach wandb (offline mode, no network) and MLflow (a
local SQLite store), a resumed run continues the same tracker runs, and a failing tracker never stops training."""

from __future__ import annotations

import json

import pytest

from rl.config import ConfigError, load_config
from rl.tracking import MetricsLogger, TrackerSettings, flatten
from tests.tracker_records import wandb_records

CONFIG = {"algorithm": {"clip_eps_low": 0.2, "advantage_estimator": "grpo"}, "run": {"seed": 3}}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _log_steps(logger: MetricsLogger, steps) -> None:
    for step in steps:
        logger.log(step, {"reward/mean": step / 10, "eval/math500/pass@4": 0.5, "note": "text", "flag": True,
                          "nan": float("nan")})


def test_wandb_and_mlflow_get_metrics_name_tags_config_and_resume_continues(tmp_path, offline):
    settings = TrackerSettings(trackers=("jsonl", "wandb", "mlflow"), name="demo-1", project="proj",
                               tags=("cpu", "grpo"), config=CONFIG)
    logger = MetricsLogger(tmp_path, settings)
    _log_steps(logger, [0, 1, 2])
    logger.close()
    state = json.loads((tmp_path / "trackers.json").read_text())

    resumed = MetricsLogger(tmp_path, settings, resume=True)
    _log_steps(resumed, [3])
    resumed.close()
    assert json.loads((tmp_path / "trackers.json").read_text()) == state  # the same runs continue

    # wandb: one run id, its name and tags, the config, and the history of every step
    records = wandb_records(tmp_path)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {state["wandb_id"]}
    assert runs[0].display_name == "demo-1" and list(runs[0].tags) == ["cpu", "grpo"]
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in runs[0].config.update}
    assert config["algorithm"] == CONFIG["algorithm"] and config["run"] == CONFIG["run"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["reward/mean"]) for h in history] == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3)]
    assert all("note" not in h and "flag" not in h and "nan" not in h for h in history)

    # MLflow: the run in experiment "proj" with its name, tags, flat config parameters and metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(state["mlflow_tracking_uri"])
    assert state["mlflow_tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.run_name == "demo-1" and run.info.status == "FINISHED"
    assert {"cpu", "grpo"} <= set(run.data.tags)
    assert run.data.params == {"algorithm.clip_eps_low": "0.2", "algorithm.advantage_estimator": "grpo",
                               "run.seed": "3"}
    assert client.get_experiment(run.info.experiment_id).name == "proj"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [
        (0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3)]
    # '@' is not allowed in MLflow names: eval/math500/pass@4 is logged as eval/math500/pass_4
    assert len(client.get_metric_history(run.info.run_id, "eval/math500/pass_4")) == 4
    # and metrics.jsonl holds everything, strings included
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[0]["note"] == "text"


def test_a_new_run_in_the_same_folder_starts_new_tracker_runs(tmp_path, offline):
    settings = TrackerSettings(trackers=("jsonl", "wandb"), name="a", config=CONFIG)
    first = MetricsLogger(tmp_path, settings)
    first.close()
    id1 = json.loads((tmp_path / "trackers.json").read_text())["wandb_id"]
    second = MetricsLogger(tmp_path, settings)  # not a resume
    second.close()
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb_id"] != id1


def test_a_tracker_failing_mid_run_is_switched_off_and_training_goes_on(tmp_path, offline, capsys):
    logger = MetricsLogger(tmp_path, TrackerSettings(trackers=("jsonl",), config=CONFIG))

    class Broken:
        name = "broken"

        def log(self, step, scalars):
            raise ConnectionError("dashboard down")

        def close(self):
            pass

    logger._trackers.append(Broken())
    _log_steps(logger, [0, 1])
    logger.close()
    err = capsys.readouterr().err
    assert err.count("tracker broken failed at step 0 (ConnectionError: dashboard down)") == 1
    assert "step 1" not in err
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_tracker_that_cannot_start_names_the_fix(tmp_path, monkeypatch):
    import wandb

    wandb.teardown()  # wandb keeps its settings (offline, from the tests above) for the life of a process
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_cfg"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with pytest.raises(ValueError, match="run.trackers: wandb could not start .*WANDB_MODE=offline"):
        MetricsLogger(tmp_path, TrackerSettings(trackers=("jsonl", "wandb")))


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_tracker_config_errors():
    with pytest.raises(ConfigError, match="must include jsonl"):
        load_config(None, ["model.build_tiny=true", "run.trackers=[wandb]"])
    with pytest.raises(ConfigError, match=r"run.tensorboard=False was removed: list the trackers in run.trackers"):
        load_config(None, ["model.build_tiny=true", "run.tensorboard=false"])
    with pytest.raises(ConfigError, match="run.trackers"):
        load_config(None, ["model.build_tiny=true", "run.trackers=[jsonl,neptune]"])
    cfg = load_config(None, ["model.build_tiny=true", "run.trackers=[jsonl,wandb,mlflow]", "run.tags=[a,b]"])
    assert cfg.run.trackers == ["jsonl", "wandb", "mlflow"] and cfg.run.tags == ["a", "b"]
