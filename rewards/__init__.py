"""Verifiable rewards: the reward-function protocol, the math verifier, plug-ins and the worker pool.

Typical use (the driver)::

    from rewards import RewardPool, RewardRequest, RewardSpec

    with RewardPool([RewardSpec("math_verify"), RewardSpec("format_boxed", weight=0.1)]) as pool:
        results = pool.score([RewardRequest(prompt, response, gold)])
        metrics = pool.metrics()   # reward/math_verify/timeout_rate, ...

Nothing in this package imports torch or trainer code; math-verify is imported lazily by the workers.
"""

from rl.types import RewardResult
from rewards.base import (
    REWARD_REGISTRY,
    RewardEntry,
    RewardFn,
    RewardRequest,
    RewardSpec,
    call_reward,
    register_reward,
    registered_reward,
    reward_request,
)
from rewards.extract import Extraction, extract_answer
from rewards.math_verifier import MathVerifyConfig, grade_math
from rewards.plugins import check_spec, load_reward, registered_names
from rewards.pool import RewardPool
from rewards.verify_cli import verify_main

__all__ = [
    "REWARD_REGISTRY",
    "Extraction",
    "MathVerifyConfig",
    "RewardEntry",
    "RewardFn",
    "RewardPool",
    "RewardRequest",
    "RewardResult",
    "RewardSpec",
    "call_reward",
    "check_spec",
    "extract_answer",
    "grade_math",
    "load_reward",
    "register_reward",
    "registered_reward",
    "reward_request",
    "registered_names",
    "verify_main",
]
