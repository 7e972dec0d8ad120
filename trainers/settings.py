"""What a learner rank is built with: the ``learner`` config section plus the values of other sections it reads.

The driver builds one :class:`LearnerSettings` per run (:meth:`LearnerSettings.from_config`) and hands the same
object to every learner rank through Ray; the learner reads it by attribute. Like every config section it refuses
unknown keys, and it is frozen: a rank cannot change what the others were given.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from rl.config import Config, LearnerConfig, LoraSection


class LearnerSettings(LearnerConfig):
    """The ``learner`` section's fields (``rl.config.LearnerConfig``), and from other sections: ``tis_cap``
    (``async_mode``) and ``lora`` (``model.lora``)."""

    model_config = ConfigDict(frozen=True)

    tis_cap: float | None = Field(
        None, gt=0,
        description="Truncated importance sampling cap of async mode (async_mode.tis_cap): each token's policy loss "
        "is multiplied by min(pi_old / pi_behaviour, tis_cap). None: no weighting (sync mode, or async mode off).",
    )
    lora: LoraSection | None = Field(
        None,
        description="LoRA training (model.lora): the base frozen, the adapters trained. None: the full model trains.",
    )

    @classmethod
    def from_config(cls, cfg: Config) -> LearnerSettings:
        """The settings of ``cfg``'s learner ranks."""
        return cls.model_validate({
            **cfg.learner.model_dump(),
            "tis_cap": cfg.async_mode.tis_cap if cfg.async_mode.enabled else None,
            "lora": cfg.model.lora.model_dump() if cfg.model.lora is not None else None,
        })

    def replace(self, **changes) -> LearnerSettings:
        """A copy with ``changes`` applied, validated like a new object (pydantic's ``model_copy(update=...)`` does
        not validate)."""
        return self.model_validate({**self.model_dump(), **changes})
