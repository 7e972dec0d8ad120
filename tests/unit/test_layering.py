"""Imports point one way, between the top-level packages, with no exceptions:

    rl (the core: types, registry, config, algorithms, metrics, data)
    <- rewards, rollout (each imports only rl and itself)
    <- trainers (the learners, the training loop, the rollout kinds, the CLI)
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"rl": 0, "rewards": 1, "rollout": 1, "trainers": 2}


def _imports(path: Path, full: bool = False):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name if full else a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module if full else node.module.split(".")[0]


def test_import_direction():
    bad = []
    for pkg, layer in LAYER.items():
        for path in (ROOT / pkg).rglob("*.py"):
            for mod in _imports(path, full=True):
                top = mod.split(".")[0]
                if top in LAYER and top != pkg and LAYER[top] >= layer:
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_no_package_file_over_800_lines():
    long = {str(p.relative_to(ROOT)): n for pkg in LAYER for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 800}
    assert not long, long


def test_drafter_package_is_plain_torch():
    for path in (ROOT / "rollout" / "drafter").rglob("*.py"):
        for mod in _imports(path, full=True):
            assert mod.split(".")[0] != "vllm", path
            assert not mod.startswith(("rl.", "rewards", "trainers")) and mod not in ("rl",), (path, mod)
            if mod.startswith("rollout"):
                assert mod.startswith("rollout.drafter"), (path, mod)


def test_rewards_never_import_torch():
    for path in (ROOT / "rewards").rglob("*.py"):
        assert "torch" not in set(_imports(path)), path
