"""The DC-CoT executor with a fake deterministic engine: batching per phase, token-exact contexts, loss masks,
budgets, limits and the longest path.

The fake tokenizer maps a character to its code point. The fake engine samples characters as code point +
``GEN`` so a sampled token can never be confused with an injected or re-tokenized one: wherever the executor
kept the engine's ids, they are >= ``GEN``; wherever it encoded a tag itself, they are < ``GEN``.
"""

from __future__ import annotations

import pytest

from rl.dccot import DCCoTConfig, check_format
from rl.types import Rollout
from rollout.dccot import TrajectoryRequest, run_dccot, to_train_samples, trajectory_metrics

GEN = 100_000
FINAL = "so \\boxed{5}</think><answer>5</answer>"  # 38 chars


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(chr(i % GEN) for i in ids)


class FakeEngine:
    """Director of a prompt ``"P<k>:"`` spawns k blocks (text ``think<r>`` + ``<spawn_workers>``), then writes
    ``FINAL``. Worker i writes ``"w<i>" * i`` + ``</worker_i>``. Honours max_tokens and stop strings."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.returned: dict[tuple[tuple[int, ...], int], Rollout] = {}

    def __call__(self, prompts, seeds, max_tokens, stops):
        self.calls.append({"prompts": prompts, "seeds": seeds, "max_tokens": max_tokens, "stops": stops})
        out = []
        for prompt, seed, limit, stop in zip(prompts, seeds, max_tokens, stops):
            context = decode(prompt)
            if context.endswith(">") and context[context.rfind("<") :].startswith("<worker_"):
                i = int(context[context.rfind("_") + 1 : -1])
                text = f"w{i}" * i + f"</worker_{i}>"
            else:
                rounds = int(context[1 : context.index(":")])
                done = context.count("</spawn_workers>")
                text = f"think{done}<spawn_workers>" if done < rounds else FINAL
            for s in stop:  # cut after the first stop string, kept in the output
                if s in text:
                    text = text[: text.index(s) + len(s)]
            finish = "stop"
            if len(text) > limit:
                text, finish = text[:limit], "length"
            ids = [ord(c) + GEN for c in text]
            ro = Rollout("", list(prompt), ids, [-(k % 5) / 10 - 0.01 for k in ids], finish, 3, text)
            self.returned[(tuple(prompt), seed)] = ro
            out.append(ro)
        return out


def run(rounds: list[int], **cfg) -> tuple[FakeEngine, list]:
    engine = FakeEngine()
    requests = [TrajectoryRequest(f"p{j}", encode(f"P{k}:"), seed=10 + j) for j, k in enumerate(rounds)]
    return engine, run_dccot(engine, encode, decode, requests, DCCoTConfig(**cfg))


def test_one_batched_call_per_phase() -> None:
    engine, trajs = run([2, 1, 0])
    # director (3 problems), workers (2 x 3), director (2), workers (1 x 3), director (1)
    assert [len(c["prompts"]) for c in engine.calls] == [3, 6, 2, 3, 1]
    worker_call = engine.calls[1]
    assert worker_call["stops"] == [["</worker_1>"], ["</worker_2>"], ["</worker_3>"]] * 2
    assert engine.calls[0]["stops"] == [["<spawn_workers>"]] * 3
    assert len(set(worker_call["seeds"])) == 6  # every worker samples with its own seed
    assert [t.end_reason for t in trajs] == ["stop"] * 3
    assert [t.path_lengths.num_spawn_blocks for t in trajs] == [2, 1, 0]


def test_contexts_are_token_exact() -> None:
    engine, (traj,) = run([1])
    d0, w1, w2, w3, d1 = traj.segments
    prompt = encode("P1:")
    assert d0.prompt_token_ids == prompt and d0.num_injected == 0
    # every worker sees the director's sampled ids (ending in <spawn_workers>) plus its encoded opener
    for i, w in enumerate((w1, w2, w3), start=1):
        assert w.prompt_token_ids == prompt + d0.generated_token_ids
        assert w.engine_prompt_token_ids == prompt + d0.generated_token_ids + encode(f"<worker_{i}>")
        assert engine.returned[(tuple(w.engine_prompt_token_ids), w.seed)].response_token_ids == w.generated_token_ids
    # the director resumes on exactly the workers' sampled ids, then the encoded </spawn_workers>
    copy = []
    for i, w in enumerate((w1, w2, w3), start=1):
        copy += encode(f"<worker_{i}>") + w.generated_token_ids
    assert d1.prompt_token_ids == prompt + d0.generated_token_ids
    assert d1.engine_prompt_token_ids == prompt + d0.generated_token_ids + copy + encode("</spawn_workers>")
    assert all(t >= GEN for s in traj.segments for t in s.generated_token_ids)
    assert check_format("<think>\n" + traj.response_text).valid


def test_loss_masks_cover_exactly_the_sampled_tokens() -> None:
    engine, trajs = run([2, 1, 0])
    samples = to_train_samples(trajs, [0.5, -1.0, 2.0])
    # per trajectory: the director thread, then one sample per worker
    assert len(samples) == (1 + 6) + (1 + 3) + 1
    for s in samples:
        assert len(s.response_token_ids) == len(s.loss_mask) == len(s.behaviour_logprobs)
        assert all(t >= GEN for t, m in zip(s.response_token_ids, s.loss_mask) if m)  # only sampled tokens
        assert all(lp == 0.0 for lp, m in zip(s.behaviour_logprobs, s.loss_mask) if not m)
    for traj, first in zip(trajs, (0, 7, 11)):
        director, workers = samples[first], samples[first + 1 : first + 1 + 3 * len(traj.worker_blocks)]
        for w in workers:  # a worker sample: the opener is masked, every sampled token trained
            assert w.loss_mask == [int(t >= GEN) for t in w.response_token_ids]
        # the director thread trains its own tokens; the copy of the workers (sampled by them) stays masked
        own = sum(len(seg.generated_token_ids) for seg in traj.director_segments)
        copied = sum(sum(w.loss_mask) for w in workers) if len(traj.director_segments) > 1 else 0
        assert sum(director.loss_mask) == own
        assert sum(1 for t, m in zip(director.response_token_ids, director.loss_mask) if t >= GEN and not m) == copied
    # each sampled token is trained exactly once: trained tokens == tokens the engine returned
    sampled = sum(len(ro.response_token_ids) for ro in engine.returned.values())
    assert sum(sum(s.loss_mask) for s in samples) == sampled
    trained_logprobs = sorted(lp for s in samples for lp, m in zip(s.behaviour_logprobs, s.loss_mask) if m)
    assert trained_logprobs == sorted(lp for ro in engine.returned.values() for lp in ro.logprobs)
    assert [s.advantage for s in samples] == [0.5] * 7 + [-1.0] * 4 + [2.0]
    assert [s.group_id for s in samples] == ["p0"] * 7 + ["p1"] * 4 + ["p2"]


def test_director_sample_replays_every_director_prompt() -> None:
    _, (traj,) = run([2])
    director = to_train_samples([traj], [1.0])[0]
    full = director.prompt_token_ids + director.response_token_ids
    for seg in traj.director_segments:
        start = len(seg.engine_prompt_token_ids)
        assert full[:start] == seg.engine_prompt_token_ids
        assert full[start : start + len(seg.generated_token_ids)] == seg.generated_token_ids


def test_longest_path_hand_checked() -> None:
    _, (traj,) = run([1])
    # director 0: "think0<spawn_workers>" = 21; workers: opener (10) + "w1"*1 / "w2"*2 / "w3"*3 + closer (11)
    # = 23, 25, 27; director 1: "</spawn_workers>" (16) + FINAL (38) = 54.
    assert [s.path_tokens for s in traj.segments] == [21, 23, 25, 27, 54]
    lengths = traj.path_lengths
    assert lengths.longest_path_tokens == 21 + 27 + 54 == 102
    assert lengths.total_tokens == 21 + 23 + 25 + 27 + 54 == 150
    assert traj.reward_metadata() == {"longest_path_tokens": 102, "num_response_tokens": 150, "num_spawn_blocks": 1}


def test_total_budget_cuts_and_drops_workers() -> None:
    # T = 21 + 23 + 25 + 14: worker 3 keeps its opener and 4 tokens; the director does not resume.
    _, (traj,) = run([1], max_path_tokens=83, max_total_tokens=83)
    assert traj.end_reason == "budget"
    assert [s.path_tokens for s in traj.segments] == [21, 23, 25, 14]
    w3 = traj.segments[-1]
    assert w3.finish_reason == "length" and w3.text == "<worker_3>w3w3"
    assert (traj.path_lengths.longest_path_tokens, traj.path_lengths.total_tokens) == (21 + 25, 83)
    # T = 21 + 23 + 25 + 5: worker 3 would keep half its opener: dropped.
    _, (traj,) = run([1], max_path_tokens=74, max_total_tokens=74)
    assert [s.worker for s in traj.segments] == [0, 1, 2]
    assert traj.response_text == "think0<spawn_workers><worker_1>w1</worker_1><worker_2>w2w2</worker_2>"
    assert check_format("<think>\n" + traj.response_text).reason == "unclosed_spawn"


def test_path_budget_limits_worker_max_tokens() -> None:
    # P = 21 + 20: each worker may generate 20 - 10 (opener) = 10 tokens; none reaches its closer.
    engine, (traj,) = run([1], max_path_tokens=41)
    assert engine.calls[1]["max_tokens"] == [10, 10, 10]
    assert [s.path_tokens for s in traj.segments] == [21, 20, 20, 20]
    assert traj.end_reason == "budget"
    assert traj.path_lengths.longest_path_tokens == 41


def test_unclosed_worker_director_still_resumes() -> None:
    _, (traj,) = run([1], max_worker_tokens=3)
    assert [s.role for s in traj.segments] == ["director", "worker", "worker", "worker", "director"]
    assert all(w.finish_reason == "length" for w in traj.segments[1:4])
    assert traj.end_reason == "stop"
    assert check_format("<think>\n" + traj.response_text).reason == "unclosed_worker"
    assert trajectory_metrics([traj])["rollout/dccot/worker_unclosed_frac"] == 1.0


def test_spawn_and_director_limits() -> None:
    _, (traj,) = run([3], max_spawn_blocks=1)
    assert traj.end_reason == "spawn_limit"
    assert [s.role for s in traj.segments] == ["director", "worker", "worker", "worker", "director"]
    _, (traj,) = run([1], max_director_segment_tokens=5)
    assert traj.end_reason == "director_limit"
    assert [s.text for s in traj.segments] == ["think"]


def test_metrics_and_advantage_count() -> None:
    _, trajs = run([2, 1, 0])
    metrics = trajectory_metrics(trajs)
    assert metrics["rollout/dccot/spawn_blocks_mean"] == pytest.approx(1.0)
    assert metrics["rollout/dccot/no_spawn_frac"] == pytest.approx(1 / 3)
    assert metrics["rollout/dccot/end_stop_frac"] == 1.0
    assert metrics["rollout/dccot/parallelism_mean"] > 1.0
    with pytest.raises(ValueError, match="advantages"):
        to_train_samples(trajs, [0.0])


def test_contract_violations_are_reported() -> None:
    def too_long(prompts, seeds, max_tokens, stops):
        return [Rollout("", p, [GEN] * (m + 1), [0.0] * (m + 1), "length", 0, "x") for p, m in zip(prompts, max_tokens)]

    with pytest.raises(RuntimeError, match="max_tokens"):
        run_dccot(too_long, encode, decode, [TrajectoryRequest("p", encode("P1:"), 0)], DCCoTConfig(max_path_tokens=8))
