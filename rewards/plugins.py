"""Resolve a reward spec name to a callable reward.

Three forms of ``RewardSpec.name``:

* a registered name: ``math_verify``, ``format_boxed``, ``length_penalty`` (see :func:`registered_names`);
* ``package.module:function``: imported with ``importlib`` from the normal import path;
* ``path/to/file.py:function``: executed from exactly that file (relative paths are relative to the current
  directory); nothing is searched for.

A plug-in function declares itself a verifier (its ``correct`` is the verdict the pool reports, and its
"incorrect" verdicts are audited) by setting the attribute ``is_verifier = True`` on the function.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
from pathlib import Path

from rewards import builtin as _builtin  # noqa: F401  (registers format_boxed, length_penalty)
from rewards import dccot as _dccot  # noqa: F401  (registers dccot, dccot_format, dccot_path_penalty)
from rewards import math_verifier as _math_verifier  # noqa: F401  (registers math_verify)
from rewards.base import REWARD_REGISTRY, RewardEntry, RewardSpec, registered_reward
from rl.plugin_files import load_file_module

_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")
_MODULE_RE = _ATTR_RE


def registered_names() -> list[str]:
    """Names usable as ``RewardSpec.name`` without a ``:``."""
    return REWARD_REGISTRY.names()


def _forms_hint() -> str:
    return (
        f"valid registered names are {registered_names()}; a plug-in is named 'package.module:function' "
        "or 'path/to/file.py:function'"
    )


def split_spec_name(name: str) -> tuple[str, str, str]:
    """Classify a spec name: ``("registered", name, "")``, ``("module", module, attr)`` or
    ``("file", path, attr)``. Raises ValueError on malformed names (without importing anything)."""
    name = name.strip()
    if ":" not in name:
        if name not in REWARD_REGISTRY:
            raise ValueError(f"unknown reward {name!r}; {_forms_hint()}")
        return "registered", name, ""
    target, _, attr = name.rpartition(":")
    if not _ATTR_RE.match(attr):
        raise ValueError(f"reward spec {name!r}: {attr!r} after ':' is not a function name; {_forms_hint()}")
    if target.endswith(".py") or "/" in target or os.sep in target:
        return "file", target, attr
    if not _MODULE_RE.match(target):
        raise ValueError(f"reward spec {name!r}: {target!r} is neither a module path nor a .py file; {_forms_hint()}")
    return "module", target, attr


def check_spec(spec: RewardSpec) -> None:
    """Cheap checks the driver can run before starting any process: the name is well formed, a registered
    name exists, a plug-in file exists. Raises ValueError naming the spec."""
    kind, target, _ = split_spec_name(spec.name)
    if kind == "registered":
        entry = registered_reward(target)
        _check_signature(entry, spec)
        if entry.check_kwargs is not None:
            try:
                entry.check_kwargs(spec.kwargs)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"reward spec {spec.name!r}: bad kwargs {spec.kwargs!r}: {exc}") from exc
    if kind == "file" and not Path(target).is_file():
        raise ValueError(
            f"reward spec {spec.name!r}: file {target!r} not found (relative to {os.getcwd()}); "
            "give the path to a .py file that defines the function"
        )


def _load_file_module(path_text: str, spec_name: str):
    return load_file_module(path_text, f"reward spec {spec_name!r}", "_rl_reward_plugin_")


def _load_module(module_name: str, spec_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"reward spec {spec_name!r}: cannot import {module_name!r} ({exc}); install the package or put it on "
            "PYTHONPATH, or name a file as 'path/to/file.py:function'"
        ) from exc
    except Exception as exc:
        raise ValueError(f"reward spec {spec_name!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc


def load_reward(spec: RewardSpec) -> RewardEntry:
    """Import the reward a spec names and check that it can be called with the common signature.

    Raises ValueError naming the spec on any problem (unknown name, import error, missing attribute,
    not callable, signature that does not accept ``(prompt, response, answer, metadata, **spec.kwargs)``).
    """
    kind, target, attr = split_spec_name(spec.name)
    if kind == "registered":
        entry = registered_reward(target)
    else:
        module = _load_file_module(target, spec.name) if kind == "file" else _load_module(target, spec.name)
        fn = module
        for part in attr.split("."):
            if not hasattr(fn, part):
                public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
                raise ValueError(f"reward spec {spec.name!r}: {target!r} has no attribute {attr!r}; it defines {public}")
            fn = getattr(fn, part)
        if not callable(fn):
            raise ValueError(f"reward spec {spec.name!r}: {attr!r} is a {type(fn).__name__}, not a function")
        entry = RewardEntry(
            name=attr.rsplit(".", 1)[-1],
            fn=fn,
            is_verifier=bool(getattr(fn, "is_verifier", False)),
            description=(inspect.getdoc(fn) or "").split("\n", 1)[0],
        )
    _check_signature(entry, spec)
    return entry


def _check_signature(entry: RewardEntry, spec: RewardSpec) -> None:
    try:
        signature = inspect.signature(entry.fn)
    except (TypeError, ValueError):
        return  # builtins / C functions: nothing to check, the smoke call will tell
    try:
        signature.bind("prompt", "response", "answer", {}, **spec.kwargs)
    except TypeError as exc:
        raise ValueError(
            f"reward spec {spec.name!r}: {entry.name}{signature} cannot be called as "
            f"{entry.name}(prompt, response, answer, metadata, **{spec.kwargs!r}): {exc}"
        ) from exc
