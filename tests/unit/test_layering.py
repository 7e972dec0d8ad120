"""Imports point one way: rl core <- rewards, rollout, trainers <- rl.driver / rl.cli."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = ("rl", "rollout", "rewards", "trainers")
# rl modules that sit on top of everything (they may import the other packages).
RL_SHELL = {"rl/driver.py", "rl/cli.py", "rl/report.py", "rl/evaluation.py",
            # the DC-CoT model builder replays its demonstrations through the rollout executor (rollout/dccot.py)
            "trainers/tiny_dccot.py"}
ALLOWED = {"rollout": {"rl", "rollout"}, "rewards": {"rl", "rewards"}, "trainers": {"rl", "trainers"}}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_import_direction():
    bad = []
    for pkg in TOP:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if rel in RL_SHELL:
                continue
            allowed = ALLOWED.get(pkg, {"rl"})
            for mod in _imports(path):
                if mod in TOP and mod not in allowed:
                    bad.append(f"{rel} imports {mod}")
    assert not bad, bad


def test_rewards_never_import_torch():
    for path in (ROOT / "rewards").rglob("*.py"):
        assert "torch" not in set(_imports(path)), path
