"""Resolving reward specs: registered names, module paths, file paths, and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from rewards.base import SMOKE_REQUEST, RewardSpec, call_reward
from rewards.plugins import check_spec, load_reward, registered_names, split_spec_name

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "reward_plugins.py"
EXAMPLE = REPO / "examples" / "my_reward.py"


def test_builtins_are_registered() -> None:
    assert {"math_verify", "format_boxed", "length_penalty"} <= set(registered_names())
    assert load_reward(RewardSpec("math_verify")).is_verifier
    assert not load_reward(RewardSpec("format_boxed")).is_verifier


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown reward 'math_verifyy'.*'format_boxed'.*'math_verify'"):
        check_spec(RewardSpec("math_verifyy"))


@pytest.mark.parametrize(
    ("name", "kind"),
    [("math_verify", "registered"), ("pkg.mod:fn", "module"), ("a/b.py:fn", "file"), ("b.py:fn", "file")],
)
def test_split_spec_name(name: str, kind: str) -> None:
    assert split_spec_name(name)[0] == kind


@pytest.mark.parametrize("name", ["pkg.mod:", "pkg.mod:1fn", "pkg mod:fn", "pkg.mod:fn-x"])
def test_malformed_plugin_names(name: str) -> None:
    with pytest.raises(ValueError, match="reward spec"):
        split_spec_name(name)


def test_registered_kwargs_are_checked_early() -> None:
    with pytest.raises(ValueError, match=r"math_verify.*unknown option.*'float_roundin'"):
        check_spec(RewardSpec("math_verify", kwargs={"float_roundin": 3}))
    with pytest.raises(ValueError, match="cannot be called"):
        check_spec(RewardSpec("length_penalty", kwargs={"max_len": 3}))


def test_missing_file_is_reported_with_cwd() -> None:
    with pytest.raises(ValueError, match=r"file 'nope/missing.py' not found"):
        check_spec(RewardSpec("nope/missing.py:fn"))


def test_load_by_path_from_the_example_file() -> None:
    entry = load_reward(RewardSpec(f"{EXAMPLE}:integer_match"))
    assert entry.name == "integer_match" and entry.is_verifier
    result = call_reward(entry, SMOKE_REQUEST)
    assert result.correct and result.extracted == "2"
    assert call_reward(entry, SMOKE_REQUEST.__class__("", "\\boxed{1000}", "1000")).status == "parse_fail"
    shows_work = load_reward(RewardSpec(f"{EXAMPLE}:shows_work"))
    assert call_reward(shows_work, SMOKE_REQUEST).status == "ok"  # async function


def test_load_by_relative_path(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    assert load_reward(RewardSpec("examples/my_reward.py:integer_match", kwargs={"max_value": 99})).is_verifier


def test_load_by_module_path() -> None:
    entry = load_reward(RewardSpec("tests.fixtures.reward_plugins:says_yes"))
    assert call_reward(entry, SMOKE_REQUEST.__class__("", "yes", "")).correct


def test_missing_attribute_lists_what_the_file_defines() -> None:
    with pytest.raises(ValueError, match=r"has no attribute 'nope'.*'says_yes'"):
        load_reward(RewardSpec(f"{FIXTURES}:nope"))


def test_bad_signature_is_reported() -> None:
    with pytest.raises(ValueError, match=r"wrong_signature\(text\) cannot be called"):
        load_reward(RewardSpec(f"{FIXTURES}:wrong_signature"))
    with pytest.raises(ValueError, match="cannot be called"):
        load_reward(RewardSpec(f"{FIXTURES}:says_yes", kwargs={"extra": 1}))


def test_unimportable_module_gives_a_hint() -> None:
    with pytest.raises(ValueError, match=r"cannot import 'no_such_pkg_xyz.mod'.*path/to/file.py"):
        load_reward(RewardSpec("no_such_pkg_xyz.mod:fn"))


def test_file_that_raises_on_import(tmp_path: Path) -> None:
    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text("raise RuntimeError('import-time failure')\n")
    with pytest.raises(ValueError, match=r"executing .*bad_plugin.py failed: RuntimeError: import-time failure"):
        load_reward(RewardSpec(f"{plugin}:fn"))
