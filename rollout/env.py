"""Step-wise text environments for multi-turn RL (GiGPO): the protocol and the registry of named environments.

An environment is reset with a seed (same seed, same initial state: a group of trajectories shares it), shows
an observation text, and takes the model's response text as an action. ``state_key`` names the current state
canonically so that steps of different trajectories that reach the same state can be compared (anchor groups).

Configs select an environment by name: ``make_env("number_target", max_steps=6)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rl.registry import Registry


@dataclass
class StepResult:
    """Outcome of one action.

    observation: the next observation text (the next prompt); ignored when ``done``.
    reward:      the step's reward.
    done:        the episode is over (success, failure or the environment's own step limit).
    info:        extras for metrics, e.g. ``{"invalid_action": True, "success": False}``.
    """

    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class StepEnv(Protocol):
    """A text environment stepped one action at a time. Model output is untrusted: ``step`` never raises on it."""

    max_steps: int  # the environment ends every episode after at most this many steps

    def reset(self, seed: int) -> str:
        """Start an episode; the same seed gives the same initial state. Returns the first observation."""
        ...

    def step(self, action_text: str) -> StepResult:
        """Apply the model's raw response text as an action."""
        ...

    def state_key(self) -> str:
        """Canonical current state (no step counter, no history): equal keys mean the same state."""
        ...


EnvFactory = Callable[..., StepEnv]

ENVIRONMENTS: Registry[EnvFactory] = Registry("environment")


def make_env(name: str, **options: Any) -> StepEnv:
    """A fresh environment ``name`` built with its keyword options (``ValueError`` listing valid names if unknown)."""
    return ENVIRONMENTS.get(name)(**options)


# Registers the built-in environments (imported last: it imports this module's names).
from rollout import envs_builtin as _envs_builtin  # noqa: E402,F401
