"""trainers.evaluation without engines: records, statistics, flat metrics, the generation log, prompts, outputs."""

import json

import pytest

from trainers.evaluation import (
    BenchmarkSpec,
    GenerationLog,
    SampleRecord,
    check_ks,
    default_ks,
    evaluate_benchmarks,
    load_benchmark,
    make_prompt_formatter,
    make_records,
    markdown_table,
    parse_benchmarks,
    plot_pass_at_k,
    request_seed,
    summarize_benchmarks,
)
from rl.types import PromptItem, RewardResult, Rollout


def _rollout(pid: str, text: str, tokens: int = 3) -> Rollout:
    return Rollout(pid, [1], list(range(tokens)), [0.0] * tokens, "stop", 0, text)


def _grade(answer: str, text: str) -> RewardResult:
    got = text.split()[-1] if text.split() else None
    return RewardResult(float(got == answer), got == answer, got, "ok" if got else "parse_fail")


def _fake_fns(responses: dict[str, list[str]]):
    """generate_fn / score_fn over canned responses: the last word is the answer."""

    def generate_fn(items, n):
        return [[_rollout(it.id, t) for t in responses[it.id][:n]] for it in items]

    def score_fn(items, groups):
        return [_grade(it.answer, r.response_text) for it, g in zip(items, groups) for r in g]

    return generate_fn, score_fn


ITEMS = {
    "a": [PromptItem("p1", "q1", "4", {"level": "1"}), PromptItem("p2", "q2", "9", {"level": "2"})],
    "b": [PromptItem("p1", "q3", "2", {})],
}
RESPONSES = {"p1": ["x 4", "x 5", "x 4", "x 2", ""], "p2": ["9", "1", "1", "1", "1"]}


def test_evaluate_benchmarks_flat_metrics_hand_computed():
    gen, score = _fake_fns(RESPONSES)
    # benchmark b reuses id p1 (answer 2): ids are only unique within a benchmark
    m = evaluate_benchmarks(gen, score, ITEMS, n=5, ks=[1, 2, 4], num_resamples=200)
    # a/p1: c=2 of 5; a/p2: c=1 of 5
    assert m["eval/a/pass@1"] == pytest.approx((0.4 + 0.2) / 2)
    assert m["eval/a/pass@2"] == pytest.approx((0.7 + 0.4) / 2)
    assert m["eval/a/mean@5"] == pytest.approx(3 / 10)
    # maj@4: p1 votes 4,5,4,2 -> "4" (right); p2 votes 9,1,1,1 -> "1" (wrong)
    assert m["eval/a/maj@4"] == pytest.approx(0.5)
    assert m["eval/b/pass@1"] == pytest.approx(0.2)  # b/p1 answer 2: one of five
    assert m["eval/overall/num_problems"] == 3.0
    assert m["eval/overall/pass@1"] == pytest.approx((0.4 + 0.2 + 0.2) / 3)
    assert m["eval/a/pass@1_ci_low"] <= m["eval/a/pass@1"] <= m["eval/a/pass@1_ci_high"]
    assert m["eval/a/response_tokens_mean"] == 3.0
    assert "perf/eval_s" in m


def test_evaluate_benchmarks_rejects_k_above_n_and_short_groups():
    gen, score = _fake_fns(RESPONSES)
    with pytest.raises(ValueError, match=r"1 <= k <= n: got k=\[8\] with n=5"):
        evaluate_benchmarks(gen, score, ITEMS, n=5, ks=[1, 8])
    with pytest.raises(ValueError, match="group sizes"):
        evaluate_benchmarks(lambda items, n: [[_rollout(i.id, "1")] for i in items], score, ITEMS, n=2)


def test_default_and_checked_ks():
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(1) == [1]
    assert check_ks([4, 1, 1], 4) == [1, 4]
    with pytest.raises(ValueError):
        check_ks([0], 4)


def test_summary_breakdown_by_level():
    gen, score = _fake_fns(RESPONSES)
    items = ITEMS["a"]
    recs = make_records("a", items, gen(items, 5), score(items, gen(items, 5)))
    assert recs[0].group == {"level": "1"} and recs[0].sample_index == 0 and recs[4].extracted is None
    s = summarize_benchmarks(recs, [1, 4], num_resamples=100)
    assert set(s) == {"a"}  # one benchmark: no "overall"
    by = s["a"]["by"]["level"]
    assert by["1"]["pass@k"]["1"]["value"] == pytest.approx(0.4)
    assert by["2"]["pass@k"]["4"]["value"] == pytest.approx(0.8)
    assert s["a"]["grading"] == {"ok": 9, "parse_fail": 1}
    assert set(s["a"]["pass@k"]) == {"1", "2", "3", "4", "5"}  # the whole curve
    table = markdown_table(s, [1, 4])
    assert "| a | 2 | 5 | 30.0 [" in table and "a by level:" in table


def test_generation_log_resume_drops_torn_line_and_partial_problems(tmp_path):
    gen, score = _fake_fns(RESPONSES)
    items = ITEMS["a"]
    recs = make_records("a", items, gen(items, 5), score(items, gen(items, 5)))
    log = GenerationLog(tmp_path / "g.jsonl")
    log.append(recs[:5])  # p1 complete
    log.append(recs[5:8])  # p2 partial (3 of 5)
    with log.path.open("a") as f:
        f.write('{"benchmark": "a", "id": "p')  # crash mid-line
    loaded = log.load(5)
    assert [(r.id, r.sample_index) for r in loaded] == [("p1", i) for i in range(5)]
    assert log.path.read_text().endswith("\n")  # torn line cut, so appends stay valid
    log.append(recs[5:])
    assert len(log.load(5)) == 10
    for line in log.path.read_text().splitlines():  # every line is a record rl verify can read
        row = json.loads(line)
        assert {"response", "answer", "prompt", "correct"} <= set(row)
        SampleRecord(**row)


def test_request_seed_is_stable_and_distinct():
    assert request_seed(0, "math500", "p1") == request_seed(0, "math500", "p1")
    assert len({request_seed(0, "math500", "p1"), request_seed(1, "math500", "p1"),
                request_seed(0, "gsm8k", "p1")}) == 3


class _Tok:
    chat_template = "yes"

    def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>"


def test_prompt_formatter_chat_and_plain():
    fmt, used = make_prompt_formatter(_Tok(), system_prompt="Be brief.")
    assert used
    assert fmt("1+1? {{x}}") == ("<system>Be brief.<user>1+1? {{x}}\nPlease reason step by step, and put your final "
                                 "answer within \\boxed{}.<assistant>")
    plain, used = make_prompt_formatter(_Tok(), "Q: {problem}\nA:", chat_template="off")
    assert not used and plain("2+2") == "Q: 2+2\nA:"
    nochat = type("T", (), {"chat_template": None})()
    assert make_prompt_formatter(nochat, "{problem}")[1] is False
    with pytest.raises(ValueError, match="no chat template"):
        make_prompt_formatter(nochat, chat_template="on")
    with pytest.raises(ValueError, match="must contain"):
        make_prompt_formatter(_Tok(), "no placeholder")


def test_parse_benchmarks_and_limits():
    specs = parse_benchmarks("math500, data/x.jsonl", "100,20", answer_field="solution")
    assert [(s.name, s.path, s.limit, s.answer_field) for s in specs] == [
        ("math500", "math500", 100, "solution"), ("x", "data/x.jsonl", 20, "solution")]
    assert [s.limit for s in parse_benchmarks("a,b", "5")] == [5, 5]
    with pytest.raises(ValueError, match="one per benchmark"):
        parse_benchmarks("a,b,c", "1,2")
    with pytest.raises(ValueError, match="unique"):
        parse_benchmarks("a,a")


def test_load_benchmark_fields_and_bad_row_line(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text(json.dumps({"q": "1+1?", "sol": 2, "level": "Level 1"}) + "\n{oops\n")
    spec = BenchmarkSpec("mine", str(p), problem_field="q", answer_field="sol")
    with pytest.raises(ValueError, match=r"mine.jsonl:2: not valid JSON"):
        load_benchmark(spec, str.upper)
    items, rep = load_benchmark(spec, str.upper, on_bad_row="skip")
    assert items == [PromptItem("mine-1", "1+1?".upper(), "2", {"level": "Level 1"})]
    assert rep.skipped[0][0] == 2


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "problem": ["x", ""], "answer": ["1", "2"]}), p)
    with pytest.raises(ValueError, match="row 2"):
        load_benchmark(BenchmarkSpec("t", str(p)), str)
    items, rep = load_benchmark(BenchmarkSpec("t", str(p)), str, on_bad_row="skip")
    assert [i.id for i in items] == ["a"] and rep.skipped[0][0] == 2


def test_plot_writes_png(tmp_path):
    gen, score = _fake_fns(RESPONSES)
    recs = []
    for name, items in ITEMS.items():
        recs += make_records(name, items, gen(items, 5), score(items, gen(items, 5)))
    png = plot_pass_at_k(summarize_benchmarks(recs, [1, 2], num_resamples=50), tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- rl eval checks
@pytest.fixture(scope="module")
def digit_tokenizer():
    """The tiny model's tokenizer kind (byte-level BPE, one token per digit), built locally."""
    from rl.data.arith import make_arith_problems
    from trainers.tiny_model import build_tokenizer

    return build_tokenizer([it.prompt for it in make_arith_problems(200, 0, "train")])


def test_check_prompt_lengths_names_offenders_or_skips(digit_tokenizer):
    from trainers.evaluation import LongPrompt, check_prompt_lengths

    benches = {"a": [PromptItem("short", "7" * 100, "1"), PromptItem("edge", "7" * 240, "1")],
               "b": [PromptItem("long", "7" * 241, "1")]}
    # 240 + 16 = 256 fits exactly; 241 + 16 = 257 does not
    with pytest.raises(ValueError, match=r"1 prompt\(s\) leave no room for 16 response tokens within max_model_len "
                                         r"256: b/long \(241 tokens\)\. Skip them with --on-long-prompt skip"):
        check_prompt_lengths(benches, digit_tokenizer, 16, 256)
    kept, long = check_prompt_lengths(benches, digit_tokenizer, 16, 256, "skip")
    assert {b: [it.id for it in items] for b, items in kept.items()} == {"a": ["short", "edge"], "b": []}
    assert long == [LongPrompt("b", "long", 241)]
    assert check_prompt_lengths(benches, digit_tokenizer, 16, None) == (benches, [])  # context unknown: no check
    many = {"c": [PromptItem(f"p{i}", "7" * (300 + i), "1") for i in range(12)]}
    with pytest.raises(ValueError, match=r"^12 prompt\(s\).*c/p9 \(309 tokens\) and 2 more\."):
        check_prompt_lengths(many, digit_tokenizer, 16, 256)


def test_model_context_len(tmp_path, digit_tokenizer):
    from trainers.evaluation import model_context_len

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096, "n_positions": 2048}))
    assert model_context_len(tmp_path, digit_tokenizer) == 2048
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert model_context_len(tmp_path, digit_tokenizer) == 256  # the tokenizer's model_max_length
    assert model_context_len(tmp_path, type("T", (), {"model_max_length": int(1e30)})()) is None


def test_resolve_model_dir_accepts_a_training_checkpoint(tmp_path):
    from trainers.evaluation import resolve_model_dir

    plain = tmp_path / "hf"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert resolve_model_dir(str(plain)) == plain
    ckpts = tmp_path / "run" / "checkpoints"
    model = ckpts / "step_000010" / "model"  # the trainer's layout: weights + copied tokenizer files in model/
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds weights but no tokenizer files"):
        resolve_model_dir(str(ckpts / "step_000010"))
    (model / "tokenizer.json").write_text("{}")
    assert resolve_model_dir(str(ckpts / "step_000010")) == model
    with pytest.raises(ValueError, match=r"a checkpoints folder; pass one of its steps, e.g. --model .*step_000010"):
        resolve_model_dir(str(ckpts))
    with pytest.raises(ValueError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "nope"))


def test_arith_benchmark_is_the_demos_held_out_set():
    from rl.config import load_config
    from rl.data.datasets import load_dataset

    items, rep = load_benchmark(BenchmarkSpec("arith", "arith"), str.upper)  # its own prompts: no formatter
    demo, _ = load_dataset(load_config("configs/tiny_cpu.yaml", []).data.eval)
    assert len(items) == 200 and rep.num_loaded == 200
    assert items == demo
    assert items[0].id == "arith-test-000000" and items[0].prompt.startswith("Problem: Compute ")
    assert items[0].prompt.endswith(".\nSolution:\n")
    a, b = items[0].metadata["a"], items[0].metadata["b"]
    assert items[0].answer == str(a + b)
    assert load_benchmark(BenchmarkSpec("arith", "arith", limit=5), str)[0] == items[:5]
    assert [s.name for s in parse_benchmarks("arith,math500")] == ["arith", "math500"]


def test_merge_throughput_keeps_earlier_runs():
    from trainers.evaluation import merge_throughput

    first = {"engine_start_s": 40.0, "generation_s": 10.0, "response_tokens": 1000, "tokens_per_s": 100.0}
    tot = merge_throughput(None, first)
    assert tot == {"runs": 1, "engine_start_s": 40.0, "generation_s": 10.0, "response_tokens": 1000,
                   "tokens_per_s": 100.0}
    idle = {"engine_start_s": 0.0, "generation_s": 0.0, "response_tokens": 0, "tokens_per_s": None}
    assert merge_throughput({"this_run": idle, "all_runs": tot}, idle) == tot  # a resume with nothing left to do
    more = {"engine_start_s": 30.0, "generation_s": 5.0, "response_tokens": 800, "tokens_per_s": 160.0}
    tot2 = merge_throughput({"this_run": first, "all_runs": tot}, more)
    assert tot2 == {"runs": 2, "engine_start_s": 70.0, "generation_s": 15.0, "response_tokens": 1800,
                    "tokens_per_s": 120.0}
    assert merge_throughput({"this_run": first}, idle) == tot  # a summary without all_runs: its run counts


def test_run_eval_skips_long_prompts_of_a_checkpoint_before_engines(tmp_path, digit_tokenizer):
    """Every prompt too long: nothing to generate, so no engine starts; the skips are counted."""
    from trainers.evaluation import EvalSettings, run_eval

    model = tmp_path / "run" / "checkpoints" / "step_000002" / "model"
    model.mkdir(parents=True)
    digit_tokenizer.save_pretrained(model)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 64}))
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": "7" * (60 + i), "answer": "1"}) + "\n"
                            for i in range(3)))
    out = tmp_path / "o"
    settings = EvalSettings(model=str(model.parent), benchmarks=parse_benchmarks(str(data)), out_dir=str(out), n=2,
                            max_tokens=8, prompt_template="{problem}", chat_template="off")
    with pytest.raises(ValueError, match=r"3 prompt\(s\) leave no room for 8 response tokens within max_model_len 64: "
                                         r"long/q0 \(60 tokens\), long/q1 \(61 tokens\), long/q2 \(62 tokens\)"):
        run_eval(settings, progress=False)
    assert not (out / "summary.json").exists()
    settings.on_long_prompt = "skip"
    summary = run_eval(settings, progress=False)
    assert summary["skipped_long_prompts"] == {"long": {"count": 3, "ids": ["q0", "q1", "q2"],
                                                        "prompt_tokens": [60, 61, 62]}}
    assert summary["model_dir"] == str(model) and summary["max_model_len"] == 64 and summary["results"] == {}
    assert "Skipped, prompt + 8 response tokens > max_model_len 64: long: 3" in (out / "summary.md").read_text()


def test_eval_cli_defaults_match_training():
    import argparse

    from trainers.cli import _add_eval_parser
    from rl.config import RolloutConfig
    from trainers.evaluation import EvalSettings

    parser = argparse.ArgumentParser()
    _add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", "m", "--benchmarks", "arith"])
    assert args.top_p == 1.0 == EvalSettings("m", [], "o").top_p == RolloutConfig.model_fields["top_p"].default
    assert args.enforce_eager is None and EvalSettings("m", [], "o").enforce_eager is None  # eager on CPU
    assert args.on_long_prompt == "error" and args.max_model_len is None
    assert parser.parse_args(["eval", "--model", "m", "--benchmarks", "a", "--no-enforce-eager"]).enforce_eager is False
