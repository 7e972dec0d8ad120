"""``StrictModel``: the base of every typed config section.

Unknown keys are rejected, and the error names the nearest valid key (pydantic's own message gives no hint),
e.g. ``unknown gigpo option 'omgea'. Did you mean 'omega'? Valid options: gamma, omega, ...``.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown keys with a did-you-mean hint; ``_kind`` names it in errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _kind: ClassVar[str] = "config"

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            valid = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), valid, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise ValueError(f"unknown {cls._kind} option {key!r}.{hint} Valid options: {', '.join(valid)}")
        return data


class ConfigSection(BaseModel):
    """A section of ``rl.config.Config``: unknown keys are rejected (``rl.config.load_config`` names the nearest
    valid key before pydantic sees them) and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
