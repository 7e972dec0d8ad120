"""The embedded DC-CoT task, its tokenizer and warm-start rows, and the DC-CoT mode's config checks."""

from pathlib import Path

import pytest

from rl.config import ConfigError, load_config
from rl.data.dccot_arith import DCCOT_TAGS, STYLES, demonstration, make_sum_problems, split_of
from rl.dccot import SPAWN_OPEN, check_format
from rollout.dccot import to_train_samples
from trainers.tiny_dccot import build_dccot_tokenizer, demonstration_rows, demonstration_trajectory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    items = make_sum_problems(200, 0, "train")
    return build_dccot_tokenizer([t for it in items for t in (it.prompt, *(demonstration(it, s) for s in STYLES))])


def test_problems_are_deterministic_disjoint_and_correct():
    train = make_sum_problems(300, 3, "train")
    assert [it.prompt for it in train] == [it.prompt for it in make_sum_problems(300, 3, "train")]
    test = make_sum_problems(100, 3, "test")
    train_keys = {tuple(sorted(it.metadata["terms"])) for it in train}
    assert not train_keys & {tuple(sorted(it.metadata["terms"])) for it in test}
    for it in train[:20] + test[:20]:
        assert int(it.answer) == sum(it.metadata["terms"]) and len(it.metadata["terms"]) == 6
        assert split_of(tuple(it.metadata["terms"])) == it.metadata["split"]
        assert it.prompt.endswith("<think>\n")


def test_demonstration_text_hand_checked():
    (item,) = [it for it in make_sum_problems(50, 0, "train")][:1]
    t = item.metadata["terms"]
    concise = demonstration(item, "concise")
    assert concise == (
        f"Pair up.<spawn_workers><worker_1>{t[0]}+{t[1]}={t[0] + t[1]}</worker_1>"
        f"<worker_2>{t[2]}+{t[3]}={t[2] + t[3]}</worker_2><worker_3>{t[4]}+{t[5]}={t[4] + t[5]}</worker_3>"
        f"</spawn_workers>{t[0] + t[1]}+{t[2] + t[3]}+{t[4] + t[5]}={sum(t)}</think>"
        f"<answer>\\boxed{{{sum(t)}}}</answer>"
    )
    with pytest.raises(ValueError, match="valid are"):
        demonstration(item, "terse")


@pytest.mark.parametrize("style", STYLES)
def test_demonstrations_are_format_valid(style):
    for it in make_sum_problems(30, 1, "train"):
        check = check_format("<think>\n" + demonstration(it, style))
        assert check.valid, check


def test_every_tag_is_one_token_and_text_round_trips(tokenizer):
    for tag in DCCOT_TAGS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    text = "x9<worker_2>Add 3 and 5: 3+5=8</worker_2></spawn_workers>"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_replayed_demonstration_layout_and_latency(tokenizer):
    item = make_sum_problems(1, 0, "train")[0]
    lengths = {}
    for style in STYLES:
        traj = demonstration_trajectory(item, style, tokenizer)
        assert traj.end_reason == "stop" and traj.response_text == demonstration(item, style)
        segs = traj.segments
        assert [s.role for s in segs] == ["director", "worker", "worker", "worker", "director"]
        enc = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        d0 = enc(demonstration(item, style).split(SPAWN_OPEN)[0] + SPAWN_OPEN)
        workers = [s.path_tokens for s in segs[1:4]]
        # longest path = director 0 + the longest worker (opener included) + the last director segment
        assert traj.path_lengths.longest_path_tokens == d0 + max(workers) + segs[4].path_tokens
        assert traj.path_lengths.total_tokens == d0 + sum(workers) + segs[4].path_tokens
        lengths[style] = traj.path_lengths.longest_path_tokens
    assert lengths["concise"] + 15 < lengths["verbose"]  # the latency experiment needs a real gap


def test_warm_start_rows_train_exactly_the_sampled_tokens(tokenizer):
    item = make_sum_problems(1, 0, "train")[0]
    traj = demonstration_trajectory(item, "concise", tokenizer)
    rows = demonstration_rows([item], tokenizer, seed=0, styles=["concise"])
    assert len(rows) == 4  # the director thread and three workers
    expected = to_train_samples([traj], [1.0])
    assert [ids for ids, _ in rows] == [s.prompt_token_ids + s.response_token_ids for s in expected]
    trained = [[t for t in labels if t != -100] for _, labels in rows]
    sampled = sum(len(s.response_token_ids) - s.num_injected for s in traj.segments)
    assert sum(map(len, trained)) == sampled
    text = [tokenizer.decode(t) for t in trained]
    assert text[0].startswith("Pair up.<spawn_workers>") and text[0].endswith("</answer><|endoftext|>")
    assert "<worker_1>" not in text[0] and "</spawn_workers>" not in text[0]  # copies and closer are context
    for i, w in enumerate(text[1:], start=1):
        assert w.endswith(f"</worker_{i}>") and "<worker_" not in w  # the injected opener is context


def _cfg(*overrides):
    return load_config(ROOT / "configs" / "dccot_tiny_cpu.yaml", list(overrides))


def test_dccot_recipes_load_and_reject_what_they_do_not_support():
    assert _cfg().kind.max_total_tokens == 160
    with pytest.raises(ConfigError, match="gdro"):
        _cfg("gdro.prompt_gdro=true")
    with pytest.raises(ConfigError, match="rollout.max_response_tokens"):
        _cfg("rollout.max_response_tokens=32")
    with pytest.raises(ConfigError, match="max_model_len=150 cannot hold"):
        _cfg("rollout.max_model_len=150")
    with pytest.raises(ConfigError, match="correct_and_format needs the dccot kind"):
        load_config(None, ["rollout.dynamic_sampling.metric=correct_and_format"])
