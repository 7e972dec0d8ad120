"""trainers.settings.LearnerSettings: what the driver hands every learner rank, built from the run's config."""

import pytest
from pydantic import ValidationError

from rl.algorithms import AlgorithmConfig
from rl.config import LearnerConfig, load_config
from trainers.settings import LearnerSettings


def test_from_config_takes_the_learner_section_and_what_else_the_learner_reads():
    cfg = load_config(None, ["model.build_tiny=true", "learner.lr=3e-4", "learner.kernels.attention=packed"])
    s = LearnerSettings.from_config(cfg)
    assert {k: getattr(s, k) for k in LearnerConfig.model_fields} == dict(cfg.learner)
    assert s.tis_cap is None and s.lora is None  # sync mode, full model
    cfg = load_config(None, ["model.build_tiny=true", "async_mode.enabled=true", "async_mode.tis_cap=1.5",
                             "model.lora={rank: 4, alpha: 8}"])
    s = LearnerSettings.from_config(cfg)
    assert s.tis_cap == 1.5 and s.lora == cfg.model.lora and s.lora is not cfg.model.lora
    # the cap of a run without async mode never reaches the learner
    assert LearnerSettings.from_config(load_config(None, ["async_mode.tis_cap=1.5"])).tis_cap is None


def test_unknown_keys_are_errors_and_the_settings_are_frozen():
    with pytest.raises(ValidationError, match="micro_batch_token"):
        LearnerSettings(micro_batch_token=64)
    s = LearnerSettings(micro_batch_tokens=64)
    with pytest.raises(ValidationError, match="frozen"):
        s.lr = 1.0
    assert s.replace(lr=1.0).lr == 1.0 and s.lr != 1.0
    with pytest.raises(ValidationError, match="micro_batch_tokens"):
        s.replace(micro_batch_tokens=1)  # replace validates (model_copy would not)


def test_every_field_is_documented():
    assert [n for n, f in LearnerSettings.model_fields.items() if not f.description] == []


def test_the_learner_refuses_a_plain_dict():
    from trainers.learner import Learner

    with pytest.raises(TypeError, match="LearnerSettings"):
        Learner("unused", {"lr": 1e-3}, AlgorithmConfig(), temperature=1.0)
    with pytest.raises(TypeError, match="AlgorithmConfig"):
        Learner("unused", LearnerSettings(), {"kl_coef": 0.0}, temperature=1.0)
