"""Rollout kinds: the registered ones and a user's, loaded by path (docs/rollout_kinds.md).

``make_kind(cfg)`` builds the kind ``cfg.kind`` names: a registered class ``Kind(cfg)``, or for ``name: plugin`` the
class ``ClassName`` of the file in ``kind.path`` (``path/to/file.py:ClassName``), built as ``Kind(cfg, options)``
with ``options`` validated by the class's ``Options`` pydantic model when it has one.
"""

from __future__ import annotations

from rl.config import Config
from rl.plugin_files import load_file_module
from rl.registry import Registry
from trainers.kinds.base import RolloutContext, RolloutKind, StepBatch
from trainers.kinds.dccot import DCCoT
from trainers.kinds.episodes import Episodes
from trainers.kinds.single_turn import SingleTurn

__all__ = ["KINDS", "RolloutContext", "RolloutKind", "StepBatch", "load_kind_class", "make_kind"]

KINDS: Registry = Registry("rollout kind")
for _cls in (SingleTurn, Episodes, DCCoT):
    KINDS.register(_cls.name)(_cls)


def load_kind_class(path: str) -> type:
    """The class named by ``path/to/file.py:ClassName`` (``ValueError`` naming what is wrong)."""
    file, sep, name = path.rpartition(":")
    if not sep or not file.endswith(".py") or not name.isidentifier():
        raise ValueError(f"kind.path={path!r}: give `path/to/file.py:ClassName`")
    module = load_file_module(file, f"kind.path={path!r}", "_rl_kind_plugin_")
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"kind.path={path!r}: {file} has no class {name!r}")
    missing = [m for m in ("collect", "evaluate") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"kind.path={path!r}: {name} lacks {', '.join(missing)} (a rollout kind implements "
                         "collect(ctx, step) -> StepBatch and evaluate(ctx, step) -> dict; docs/rollout_kinds.md)")
    return cls


def make_kind(cfg: Config) -> RolloutKind:
    """The kind ``cfg.kind`` names, built and checked before anything heavy starts."""
    if cfg.kind.name != "plugin":
        return KINDS.get(cfg.kind.name)(cfg)
    cls = load_kind_class(cfg.kind.path)
    options_model = getattr(cls, "Options", None)
    options = dict(cfg.kind.options)
    if options_model is not None:
        try:
            options = options_model.model_validate(options)
        except Exception as exc:  # noqa: BLE001 - pydantic's message names the bad option
            raise ValueError(f"kind.options for {cfg.kind.path}: {exc}") from None
    return cls(cfg, options)
