"""The driver's reward-error check: a rate-limited warning below reward_pool.max_error_rate, a RewardError naming
the reward and its first error text at or above it (after the step's samples are logged)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rl.config import load_config
from trainers.reward_guard import RewardError, RewardErrorGuard


class FakePool:
    names = ["math_verify", "my_reward"]

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def take_first_errors(self) -> dict[str, str]:
        out, self.texts = self.texts, {}
        return out


def fake_trainer(max_error_rate: float = 1.0):
    guard = RewardErrorGuard(FakePool(), load_config(None, [f"reward_pool.max_error_rate={max_error_rate}"])
                             .reward_pool.max_error_rate)
    return SimpleNamespace(guard=guard, reward_pool=guard.reward_pool, logged=[])


def check(trainer, step: int, metrics: dict[str, float], log) -> None:
    trainer.guard.check(step, metrics, before_stop=lambda: trainer.logged.append((step, log)))


def step_metrics(errors: int, graded: int = 16) -> dict[str, float]:
    return {"reward/num_graded": float(graded), "reward/math_verify/num_errors": 0.0,
            "reward/math_verify/error_rate": 0.0, "reward/my_reward/num_errors": float(errors),
            "reward/my_reward/error_rate": errors / graded}


def test_a_reward_erroring_on_every_response_stops_the_step(capsys) -> None:
    trainer = fake_trainer()
    trainer.reward_pool.texts = {"my_reward": "KeyError: 'lang'"}
    with pytest.raises(RewardError) as info:
        check(trainer, 3, step_metrics(16), ("single", "rows"))
    assert str(info.value) == ("reward 'my_reward' errored on 16/16 responses of step 3 "
                               "(reward_pool.max_error_rate=1); first error: KeyError: 'lang'")
    assert trainer.logged == [(3, ("single", "rows"))]  # the failing rows reach samples.jsonl first


def test_errors_below_the_threshold_warn_at_most_every_ten_steps(capsys) -> None:
    trainer = fake_trainer(max_error_rate=0.5)
    for step in range(1, 13):
        trainer.reward_pool.texts = {"my_reward": f"ValueError: bad row {step}"}
        check(trainer, step, step_metrics(4), ("single", None))
    lines = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(lines) == 2
    assert lines[0].startswith("[rl] warning: step 1: reward 'my_reward' errored on 4/16 responses (scored 0); "
                               "first error: ValueError: bad row 1")
    assert lines[1].startswith("[rl] warning: step 11: reward 'my_reward' errored on 4/16")
    assert trainer.logged == []
    with pytest.raises(RewardError, match="errored on 8/16 responses of step 13 .* first error: ValueError: x"):
        trainer.reward_pool.texts = {"my_reward": "ValueError: x"}
        check(trainer, 13, step_metrics(8), ("single", None))


def test_max_error_rate_is_a_fraction_in_0_1() -> None:
    assert load_config(None, []).reward_pool.max_error_rate == 1.0
    for bad in ("0", "1.5"):
        with pytest.raises(Exception, match="max_error_rate"):
            load_config(None, [f"reward_pool.max_error_rate={bad}"])
