"""The ``kind`` section: which rollout kind a run trains with, and that kind's own settings (a discriminated union
on ``kind.name``). Each kind's implementation is in ``trainers.kinds``; a user's kind is a class in a file
(``name: plugin``, docs/rollout_kinds.md).

Every kind config answers what the rest of the config and ``rl plan`` ask of it (``check``, ``step_groups``,
``step_group_size``, ``response_tokens``, ``plan_shape``, ``plan_note``), so nothing outside the kinds branches on which kind a run
uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, Field

from rl.algorithms.gigpo import GigpoConfig
from rl.dccot import DCCoTConfig
from rl.schema import ConfigSection as _Section

if TYPE_CHECKING:
    from rl.config import Config


class KindQuestions:
    """The defaults: a kind whose groups are ``rollout.prompts_per_step`` prompts x
    ``rollout.num_samples_per_prompt`` responses of at most ``rollout.max_response_tokens``."""

    sample_unit: ClassVar[str] = "responses"

    def check(self, cfg: Config) -> None:
        """Refuse what the rest of ``cfg`` sets that this kind cannot do (``ValueError``)."""
        if cfg.rollout.dynamic_sampling.metric == "correct_and_format":
            raise ValueError("rollout.dynamic_sampling.metric=correct_and_format needs the dccot kind "
                             "(kind: {name: dccot}); use accuracy or score")

    def step_groups(self, cfg: Config) -> int:
        """Groups per step (a group: the samples an advantage is relative to)."""
        return cfg.rollout.prompts_per_step

    def step_group_size(self, cfg: Config) -> int:
        return cfg.rollout.num_samples_per_prompt

    def response_tokens(self, cfg: Config) -> int:
        """The longest response one sample's context holds."""
        return cfg.rollout.max_response_tokens

    def plan_shape(self, cfg: Config, prompt_len: int, response_len: int) -> str:
        """``rl plan``'s sentence on one step's shape."""
        groups, size = self.step_groups(cfg), self.step_group_size(cfg)
        return (f"Each step: {groups} prompts x {size} samples = {groups * size} responses, up to {groups * size} x "
                f"(prompt {prompt_len} + response {response_len}) tokens")

    def plan_note(self, cfg: Config) -> str:
        """What else ``rl plan`` says of the step's shape (empty: nothing)."""
        return ""


class SingleTurnKind(KindQuestions, _Section):
    """Single-turn prompts from ``data.train``: ``rollout.num_samples_per_prompt`` responses per prompt, each graded
    by ``rewards`` (GRPO and its relatives, DAPO's dynamic sampling, GDRO, differential smoothing)."""

    name: Literal["single_turn"] = "single_turn"


class EpisodesKind(KindQuestions, _Section):
    """Multi-turn episodes in a step-wise environment, with GiGPO's advantages: each step plays episodes instead of
    answering ``data.train`` prompts."""

    sample_unit: ClassVar[str] = "episodes"
    name: Literal["episodes"] = "episodes"
    env: str = Field(description="Environment name in `rollout.env.ENVIRONMENTS` (built in: `number_target`).")
    env_options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the environment.")
    groups_per_step: int = Field(8, ge=1, description="Episode groups per step (distinct start states).")
    group_size: int = Field(8, ge=1, description="Trajectories per group, all from the same start state.")
    max_turns: int = Field(6, ge=1, description="Turns per episode at most (also capped by the env's own limit).")
    eval_groups: int = Field(
        64, ge=1, description="Held-out start states for eval (seeds disjoint from training); eval.num_samples each.",
    )
    gigpo: GigpoConfig = Field(default_factory=GigpoConfig)

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if cfg.algorithm.kl_coef > 0 and cfg.algorithm.kl_in == "reward":
            raise ValueError("algorithm.kl_in=reward is for single-turn prompts; with kind episodes use kl_in=loss")
        if cfg.gdro.prompt_gdro or cfg.gdro.rollout_gdro or cfg.rollout.dynamic_sampling.enabled:
            raise ValueError("kind episodes: GDRO and dynamic sampling act on single-turn prompts and are not "
                             "supported with environments; turn gdro.* and rollout.dynamic_sampling.enabled off")

    def step_groups(self, cfg: Config) -> int:
        return self.groups_per_step

    def step_group_size(self, cfg: Config) -> int:
        return self.group_size

    def plan_shape(self, cfg: Config, prompt_len: int, response_len: int) -> str:
        n = self.groups_per_step * self.group_size
        return (f"Each step: {self.groups_per_step} groups x {self.group_size} episodes = {n} episodes of up to "
                f"{self.max_turns} turns (one training sample per turn, so {n} to {n * self.max_turns} samples), "
                f"each turn up to {cfg.rollout.max_model_len} tokens")


class DCCoTKind(KindQuestions, DCCoTConfig):
    """DC-CoT parallel reasoning (docs/dccot.md): every response is a director with parallel workers run by the
    DC-CoT executor, under these budgets (``rollout.max_response_tokens`` is then not used)."""

    name: Literal["dccot"] = "dccot"

    def check(self, cfg: Config) -> None:
        """DC-CoT trains on whole director/worker trajectories; what acts on single responses is refused."""
        rollout_default = type(cfg.rollout).model_fields["max_response_tokens"].default
        unsupported = {
            "gdro.prompt_gdro / gdro.rollout_gdro": cfg.gdro.prompt_gdro or cfg.gdro.rollout_gdro,
            "algorithm.advantage_shaping": cfg.algorithm.advantage_shaping != "none",
            "algorithm.kl_in=reward": cfg.algorithm.kl_coef > 0 and cfg.algorithm.kl_in == "reward",
            "shaping.overlong_buffer_len (use the dccot reward's max_path_tokens / overlong_buffer_tokens)":
                cfg.shaping.overlong_buffer_len > 0,
            "shaping.mask_truncated": cfg.shaping.mask_truncated,
            "eval.benchmarks (DC-CoT evaluation runs on data.eval)": bool(cfg.eval.benchmarks),
            "eval.max_response_tokens (DC-CoT evaluation uses the kind's budgets)":
                cfg.eval.max_response_tokens is not None,
            "rollout.max_response_tokens (DC-CoT budgets are kind.max_path_tokens / max_total_tokens)":
                # compared with the default, not with the keys set, so that a run's written config.yaml loads back
                cfg.rollout.max_response_tokens != rollout_default,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"kind dccot does not support: {', '.join(bad)}; turn these off or choose another kind")
        if self.context_tokens >= cfg.rollout.max_model_len:
            raise ValueError(
                f"rollout.max_model_len={cfg.rollout.max_model_len} cannot hold a DC-CoT director context: its "
                f"responses can reach {self.context_tokens} tokens (kind.max_total_tokens, or max_path_tokens plus the "
                "other workers' copies); raise max_model_len above prompt length + that, or set kind.max_total_tokens"
            )

    def response_tokens(self, cfg: Config) -> int:
        return self.context_tokens

    def plan_note(self, cfg: Config) -> str:
        return ("DC-CoT: each response is a director trajectory with parallel workers, trained as its director thread "
                "and every worker (more samples than responses)")


class PluginKind(KindQuestions, _Section):
    """A rollout kind of the user's: a class in a Python file (docs/rollout_kinds.md). Its own settings are
    ``options``, validated by the class's ``Options`` model when the run starts."""

    name: Literal["plugin"] = "plugin"
    path: str = Field(description="`path/to/file.py:ClassName`: the file is loaded by path (it need not be a package).")
    options: dict[str, Any] = Field(default_factory=dict, description="The kind's settings (its `Options` model).")


KindConfig = Annotated[Union[SingleTurnKind, EpisodesKind, DCCoTKind, PluginKind], Field(discriminator="name")]
KIND_CONFIGS: dict[str, type[BaseModel]] = {c.model_fields["name"].default: c
                                            for c in (SingleTurnKind, EpisodesKind, DCCoTKind, PluginKind)}
