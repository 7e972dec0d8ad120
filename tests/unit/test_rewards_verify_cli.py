"""`rl verify`: one response from the command line, or a JSONL file with a summary and bad-row reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewards.verify_cli import verify_main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_reward.py"


def test_single_correct(capsys) -> None:
    assert verify_main(["--response", "so \\boxed{\\frac{1}{2}}", "--answer", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "correct:   True" in out and "extracted: '\\\\frac{1}{2}'" in out


def test_single_wrong_json(capsys) -> None:
    assert verify_main(["--response", "so \\boxed{3}", "--answer", "2", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["correct"] is False and result["status"] == "ok" and result["extracted"] == "3"


def test_single_with_plugin_by_path(capsys) -> None:
    args = ["--response", "\\boxed{042}", "--answer", "42", "--reward", f"{EXAMPLE}:integer_match"]
    assert verify_main(args) == 0


@pytest.mark.parametrize(
    "args",
    [[], ["--response", "x"], ["--input", "a.jsonl"], ["--response", "x", "--answer", "1", "--input", "a.jsonl"]],
)
def test_usage_errors(args, capsys) -> None:
    assert verify_main(args) == 2
    assert "rl verify" in capsys.readouterr().err


def test_unknown_reward_lists_names(capsys) -> None:
    assert verify_main(["--response", "x", "--answer", "1", "--reward", "mathverify"]) == 2
    assert "valid registered names are" in capsys.readouterr().err


def test_missing_input_file(tmp_path, capsys) -> None:
    assert verify_main(["--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "cannot read --input" in capsys.readouterr().err


def test_jsonl_file_with_bad_rows(tmp_path, capsys) -> None:
    source = tmp_path / "in.jsonl"
    rows = [
        json.dumps({"id": "a", "response": "\\boxed{5}", "answer": "5"}),
        json.dumps({"id": "b", "response": "\\boxed{6}", "answer": 5}),  # numeric gold is fine
        "{not json",
        json.dumps({"id": "d", "response": "no answer"}),  # missing gold
        "",
        json.dumps(["a", "list"]),
        json.dumps({"id": "g", "response": "nothing here", "answer": "5"}),
        json.dumps({"id": "h", "response": 7, "answer": "7"}),
    ]
    source.write_text("\n".join(rows) + "\n")
    output = tmp_path / "out" / "graded.jsonl"
    output.parent.mkdir()
    assert verify_main(["--input", str(source), "--output", str(output)]) == 1
    captured = capsys.readouterr()
    graded = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(g["line"], g["id"], g["correct"], g["status"]) for g in graded] == [
        (1, "a", True, "ok"), (2, "b", False, "ok"), (7, "g", False, "parse_fail"),
    ]
    assert "accuracy        0.3333 (1/3)" in captured.out
    assert "parse failures  1 (33.3%)" in captured.out and "bad rows        4" in captured.out
    for line in (3, 4, 6, 8):
        assert f"in.jsonl:{line}:" in captured.err
    assert "invalid JSON" in captured.err and "field 'answer' missing" in captured.err


def test_jsonl_custom_fields(tmp_path, capsys) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"completion": "#### 1,000", "gold": "1000"}) + "\n")
    output = tmp_path / "out.jsonl"
    args = ["--input", str(source), "--output", str(output), "--response-field", "completion", "--answer-field", "gold"]
    assert verify_main(args) == 0
    assert json.loads(output.read_text())["correct"] is True
    assert "accuracy        1.0000 (1/1)" in capsys.readouterr().out


LENGTH_TOKENS = "{name: length_penalty, kwargs: {unit: tokens, max_length: 8, buffer_length: 4}}"


def test_metadata_reaches_the_rewards(capsys) -> None:
    """length_penalty with unit tokens reads metadata["num_response_tokens"]: 6 tokens with max 8 and buffer 4 is
    -(6 - 4) / 4 = -0.5; without the key it errors (fail closed), as it would in a run that sent none."""
    args = ["--response", "so \\boxed{2}", "--answer", "2", "--json", "--reward", "math_verify",
            "--reward", LENGTH_TOKENS]
    assert verify_main(args + ["--metadata", '{"num_response_tokens": 6, "finish_reason": "stop"}']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["components"] == {"math_verify": 1.0, "length_penalty": -0.5} and result["score"] == 0.5
    verify_main(args)
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "error" and "length_penalty" in result["error"]
    assert "num_response_tokens" in result["error"]


@pytest.mark.parametrize("bad, message", [
    (["--metadata", "{num: 1}"], "--metadata is not valid JSON"),
    (["--metadata", "[1, 2]"], "--metadata must be a JSON object, got list"),
    (["--reward", "{kwargs: {a: 1}}"], "a mapping takes name (required)"),
    (["--reward", "{name: math_verify, wieght: 2}"], "unknown key(s) ['wieght']"),
])
def test_bad_metadata_or_reward_mapping(bad, message, capsys) -> None:
    assert verify_main(["--response", "x", "--answer", "1", *bad]) == 2
    assert message in capsys.readouterr().err


def test_file_mode_reads_a_runs_samples_with_their_metadata(tmp_path, capsys) -> None:
    """samples.jsonl rows of a run carry num_response_tokens at the top level; a row's metadata object wins;
    --metadata fills in what a row lacks."""
    src = tmp_path / "samples.jsonl"
    rows = [{"prompt_id": "a", "response": "\\boxed{2}", "answer": "2", "num_response_tokens": 8},
            {"response": "\\boxed{2}", "answer": "2", "metadata": {"num_response_tokens": 5}},
            {"response": "\\boxed{2}", "answer": "2"},
            {"response": "\\boxed{2}", "answer": "2", "metadata": [1]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "graded.jsonl"
    code = verify_main(["--input", str(src), "--output", str(out), "--reward", LENGTH_TOKENS,
                        "--metadata", '{"num_response_tokens": 4}'])
    assert code == 1  # the last row's metadata is not an object
    assert f"{src}:4: field 'metadata' is not an object (list)" in capsys.readouterr().err
    graded = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["score"] for g in graded] == [-1.0, -0.25, 0.0]
