"""Dataset loading: benchmark names, bad rows (error naming the line, or counted skips), the sampler."""

import json

import pytest

from rl.data.datasets import PromptSampler, load_jsonl_prompts, resolve_dataset
from rl.types import PromptItem


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loads_rows_and_template(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"id": "a", "problem": "1+1?", "answer": 2, "level": 3}])
    items, rep = load_jsonl_prompts(p, template="Q: {problem}")
    assert items == [PromptItem("a", "Q: 1+1?", "2", {"level": 3})]
    assert rep.num_loaded == 1 and rep.skipped == []


def test_bad_row_error_names_line(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"id": "a", "problem": "x", "answer": "1"}, "{not json", {"problem": "y"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        load_jsonl_prompts(p)


def test_bad_rows_skipped_and_counted(tmp_path):
    rows = [{"id": "a", "problem": "x", "answer": "1"}, "{not json", {"problem": "y"}, [1, 2],
            {"id": "a", "problem": "dup", "answer": "1"}, {"id": "b", "problem": "", "answer": "1"},
            {"id": "c", "problem": "ok", "answer": "3"}]
    items, rep = load_jsonl_prompts(_write(tmp_path / "d.jsonl", rows), on_bad_row="skip")
    assert [it.id for it in items] == ["a", "c"]
    assert [line for line, _ in rep.skipped] == [2, 3, 4, 5, 6]
    assert "missing field 'answer'" in rep.skipped[1][1]
    assert "duplicate id" in rep.skipped[3][1]


def test_custom_fields_and_limit(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"q": f"p{i}", "a": i} for i in range(5)])
    items, _ = load_jsonl_prompts(p, problem_field="q", answer_field="a", limit=3)
    assert [it.answer for it in items] == ["0", "1", "2"] and items[0].id == "d-1"


def test_resolve_names(tmp_path):
    _write(tmp_path / "math500.jsonl", [{"problem": "x", "answer": "1"}])
    _write(tmp_path / "gsm8k_test.jsonl", [{"problem": "x", "answer": "1"}])
    assert resolve_dataset("math500", tmp_path).name == "math500.jsonl"
    assert resolve_dataset("gsm8k", tmp_path).name == "gsm8k_test.jsonl"
    with pytest.raises(ValueError, match="Known names in .*: gsm8k_test, math500"):
        resolve_dataset("aime99", tmp_path)


def test_sampler_epochs_and_state():
    items = [PromptItem(str(i), "p", "a") for i in range(5)]
    s = PromptSampler(items, seed=3)
    first = [it.id for it in s.next(7)]
    assert sorted(first[:5]) == [str(i) for i in range(5)]  # a full epoch before repeating
    state = s.state_dict()
    cont = [it.id for it in s.next(6)]
    s2 = PromptSampler(items, seed=3)
    s2.load_state_dict(state)
    assert [it.id for it in s2.next(6)] == cont
