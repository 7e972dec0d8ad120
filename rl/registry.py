"""A small typed registry: one per extension point (advantage estimators, policy losses, ...).

Every entry of one registry has the same call signature over one typed input, so callers look an
entry up by its configured name and call it without branching on the name. What differs between
entries and matters to the caller (does it need reference log-probs? step ids?) is declared as a
*capability* when the entry is registered::

    ADVANTAGE_ESTIMATORS = Registry("advantage estimator", capabilities={"needs_step_ids": False})

    @ADVANTAGE_ESTIMATORS.register("grpo")
    def grpo(inp: AdvantageInput, cfg: AlgorithmConfig) -> Tensor: ...

    ADVANTAGE_ESTIMATORS.get("grpo")(inp, cfg)
    ADVANTAGE_ESTIMATORS.capabilities("grpo")["needs_step_ids"]   # -> False
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """Named entries of one extension point, each with a dict of declared capabilities.

    kind:         what the entries are, used in error messages (``"policy loss"``).
    capabilities: the capability names entries of this registry may declare, with their defaults.
                  Every entry reports every capability, so callers can query any entry uniformly;
                  declaring a capability not listed here is an error (it would be a silent typo).
    """

    def __init__(self, kind: str, capabilities: Mapping[str, Any] | None = None) -> None:
        self.kind = kind
        self._defaults: dict[str, Any] = dict(capabilities or {})
        self._entries: dict[str, F] = {}
        self._capabilities: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **capabilities: Any) -> Callable[[F], F]:
        """Decorator adding ``fn`` under ``name`` with the given capability values."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        unknown = sorted(set(capabilities) - set(self._defaults))
        if unknown:
            raise ValueError(
                f"unknown capabilities {unknown} for {self.kind} {name!r}; "
                f"this registry declares {sorted(self._defaults)}"
            )

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            self._capabilities[name] = {**self._defaults, **capabilities}
            return fn

        return decorator

    def check(self, name: str) -> str:
        """Return ``name`` if registered; otherwise raise ``ValueError`` naming the valid entries."""
        if name in self._entries:
            return name
        valid = self.names()
        hint = ""
        close = difflib.get_close_matches(name, valid, n=1) if isinstance(name, str) else []
        if close:
            hint = f" Did you mean {close[0]!r}?"
        raise ValueError(f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(valid)}")

    def get(self, name: str) -> F:
        """The entry registered under ``name`` (``ValueError`` listing valid names if absent)."""
        return self._entries[self.check(name)]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def capabilities(self, name: str) -> dict[str, Any]:
        """All declared capabilities of ``name`` (defaults filled in); a copy."""
        return dict(self._capabilities[self.check(name)])

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
