"""Imports point one way: rl core <- rewards, rollout, trainers <- rl.driver / rl.cli."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = ("rl", "rollout", "rewards", "trainers")
# rl modules that sit on top of everything (they may import the other packages).
RL_SHELL = {"rl/driver.py", "rl/cli.py", "rl/report.py", "rl/evaluation.py", "rl/spec_decode.py",
            # the DC-CoT model builder replays its demonstrations through the rollout executor (rollout/dccot.py)
            "trainers/tiny_dccot.py"}
ALLOWED = {"rollout": {"rl", "rollout"}, "rewards": {"rl", "rewards"}, "trainers": {"rl", "trainers"}}
# The learner trains the speculative drafter: trainers may import rollout.drafter, which is plain torch (it
# imports neither vLLM nor the rest of rollout; checked below).
ALLOWED_MODULES = {"trainers": ("rollout.drafter",)}


def _imports(path: Path, full: bool = False):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name if full else a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module if full else node.module.split(".")[0]


def test_import_direction():
    bad = []
    for pkg in TOP:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if rel in RL_SHELL:
                continue
            allowed = ALLOWED.get(pkg, {"rl"})
            for mod in _imports(path, full=True):
                top = mod.split(".")[0]
                if top in TOP and top not in allowed and not mod.startswith(ALLOWED_MODULES.get(pkg, ())):
                    bad.append(f"{rel} imports {mod}")
    assert not bad, bad


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
