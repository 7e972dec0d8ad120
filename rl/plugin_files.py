"""Loading a user's Python file by path (reward functions, rollout kinds): only files the config names, each under
a stable module name of its own, so two plug-ins called ``reward.py`` do not collide and pickling finds them."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from pathlib import Path


def load_file_module(path_text: str, label: str, prefix: str):
    """The module of the file at ``path_text`` (loaded once per process). ``label`` names what asked for it in
    errors (``reward spec 'x.py:f'``); ``prefix`` starts the module's name. ``ValueError`` for a missing file or
    one that fails to execute."""
    path = Path(path_text).resolve()
    if not path.is_file():
        raise ValueError(f"{label}: file {path_text!r} not found (relative to {os.getcwd()})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"{prefix}{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise ValueError(f"{label}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        import_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ValueError(f"{label}: executing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module
