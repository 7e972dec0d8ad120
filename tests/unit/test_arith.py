"""The embedded arithmetic task: disjoint splits, determinism, correct answers, prompt/solution format."""

from __future__ import annotations

import pytest

from rl.data.arith import (
    DIFFICULTIES,
    format_prompt,
    is_correct,
    last_boxed,
    make_arith_problems,
    reference_solution,
    split_of,
)


def _key(item):
    m = item.metadata
    a, b = (sorted((m["a"], m["b"])) if m["op"] in "+*" else (m["a"], m["b"]))
    return m["op"], a, b


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_splits_are_disjoint_even_across_seeds(difficulty):
    train = {_key(it) for seed in (0, 1) for it in make_arith_problems(3000, seed, "train", difficulty)}
    test = {_key(it) for seed in (0, 7) for it in make_arith_problems(500, seed, "test", difficulty)}
    assert train.isdisjoint(test)
    assert all(split_of(*k) == "test" for k in test)


def test_commuted_twins_share_a_split():
    for a in range(10, 60):
        for b in range(2, 10):
            assert split_of("+", a, b) == split_of("+", b, a)
            assert split_of("*", a, b) == split_of("*", b, a)


def test_deterministic_by_seed_and_prefix_stable():
    a = make_arith_problems(300, 3, "train")
    assert a == make_arith_problems(300, 3, "train")
    assert a != make_arith_problems(300, 4, "train")
    assert a != make_arith_problems(300, 3, "train", "medium")
    assert make_arith_problems(100, 3, "train") == a[:100]


def test_ids_unique_and_formatted():
    items = make_arith_problems(1000, 0, "test")
    assert [it.id for it in items[:2]] == ["arith-test-000000", "arith-test-000001"]
    assert len({it.id for it in items}) == len(items)
    # the easy test split has ~1.6k distinct problems: 1000 of them are all distinct
    assert len({(it.metadata["op"], it.metadata["a"], it.metadata["b"]) for it in items}) == len(items)


def test_large_lists_repeat_instead_of_hanging():
    items = make_arith_problems(20_000, 0, "train", "medium")
    assert len(items) == 20_000
    ops = [it.metadata["op"] for it in items]
    assert abs(ops.count("+") / len(ops) - 1 / 2) < 0.03  # operators stay uniform after a small space is used up


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_answers_are_correct(difficulty):
    for it in make_arith_problems(300, 0, "train", difficulty):
        m = it.metadata
        assert int(it.answer) == eval(f"{m['a']} {m['op']} {m['b']}")  # operands are ints we generated
        assert int(it.answer) >= 0
        assert m["question"] == f"Compute {m['a']} {m['op']} {m['b']}."


def test_prompt_and_solution_format():
    item = make_arith_problems(1, 0, "train")[0]
    assert item.metadata["op"] == "+" and 10 <= item.metadata["a"] <= 99 and 10 <= item.metadata["b"] <= 99
    assert item.prompt == format_prompt(item.metadata["question"])
    assert format_prompt("Compute 47 + 38.") == "Problem: Compute 47 + 38.\nSolution:\n"
    sol = reference_solution(item)
    assert sol == f"{item.answer} \\boxed{{{item.answer}}}"
    assert is_correct(sol, item.answer)


def test_last_boxed_and_is_correct():
    assert last_boxed("47+38=85 \\boxed{85}") == "85"
    assert last_boxed("\\boxed{1} then \\boxed{ 2 }") == "2"
    assert last_boxed("no box 85") is None
    assert not is_correct("\\boxed{84}", "85")
    assert not is_correct("85", "85")


def test_bad_arguments_fail_with_valid_names():
    with pytest.raises(ValueError, match="valid are"):
        make_arith_problems(1, 0, "dev")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid are"):
        make_arith_problems(1, 0, "train", "expert")  # type: ignore[arg-type]
