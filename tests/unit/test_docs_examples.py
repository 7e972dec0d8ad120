"""The README's and the docs' examples, as written: every `rl ...` command in their shell blocks parses with the
real command line and config loader (and the cheap ones run), and the rewards quick start runs and gives the
values its comments promise."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from trainers.cli import main, parse_args
from rl.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Placeholders a reader replaces; a command holding one is parsed, not run.
PLACEHOLDERS = ("CHECKPOINT_DIR", "CONFIG", "ADDR", "HEAD_IP", "[", "<")


def shell_commands(path: Path) -> list[str]:
    """The `rl ...` commands of a document's ```bash and bare ``` blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)\n```", path.read_text(), flags=re.DOTALL):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line.startswith("rl ") and not line.startswith("rl train: "):
                commands.append(line)
    return commands


ALL = [(p.relative_to(ROOT).as_posix(), c) for p in DOCS for c in shell_commands(p)]


def test_the_docs_have_commands_to_check():
    kinds = {shlex.split(c)[1] for _, c in ALL}
    assert {"train", "plan", "eval", "verify", "convert-gguf"} <= kinds, kinds
    assert len(ALL) >= 20


@pytest.mark.parametrize("doc, command", ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_command_as_written(doc, command, tmp_path, monkeypatch, capsys):
    argv = shlex.split(command)[1:]
    if argv[0] == "verify":
        if any(p in command for p in PLACEHOLDERS) or " - " in command:
            return  # usage synopses with [optional] parts, or stdin
        monkeypatch.chdir(tmp_path)
        for flag in ("--input",):
            if flag in argv:  # a file the example reads: one correct row
                (tmp_path / argv[argv.index(flag) + 1]).write_text(
                    json.dumps({"response": "so \\boxed{2}", "answer": "2"}) + "\n")
        assert main(argv) == 0, (doc, command, capsys.readouterr())
        return
    if argv[0] == "train" and argv[1] == "CONFIG":
        return  # the synopsis
    args = parse_args(argv)  # every flag exists, every value has its type
    if argv[0] == "train":
        cfg = load_config(ROOT / args.config, args.overrides)  # every override key exists and validates
        assert cfg.run.num_steps >= 1
    elif argv[0] == "plan":
        monkeypatch.chdir(ROOT)
        assert main(argv) == 0, (doc, command)
    elif argv[0] == "eval":
        from rl.data.benchmarks import parse_benchmarks

        assert parse_benchmarks(args.benchmarks, args.limit)


def test_readme_rewards_override_gives_the_list_it_shows():
    command = next(c for _, c in ALL if "rewards=[" in c)
    args = parse_args(shlex.split(command)[1:])
    cfg = load_config(ROOT / args.config, args.overrides)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("math_verify", 1.0), ("format_boxed", 0.1)]
    assert args.verbose


def test_rewards_quick_start_runs_and_gives_its_commented_values(tmp_path, monkeypatch):
    doc = (ROOT / "docs" / "rewards.md").read_text()
    quick = doc.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", quick, flags=re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)  # it writes runs/exp1/audit.jsonl
    (tmp_path / "runs" / "exp1").mkdir(parents=True)
    scope: dict = {}
    exec(compile(code, "docs/rewards.md", "exec"), scope)  # noqa: S102 - our own documentation's example
    result = scope["results"][0]
    assert result.score == pytest.approx(1.0 + 0.1 * 1.0 + 0.0)
    assert result.correct is True
    assert result.components == {"math_verify": 1.0, "format_boxed": 1.0, "length_penalty": 0.0}
