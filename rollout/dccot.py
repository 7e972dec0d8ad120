"""DC-CoT rollouts: directors and their parallel workers, all problems in lock-step, one batched call per phase.

A round has two phases (``docs/dccot.md`` "Executor"):

1. *director*: every unfinished trajectory continues its director with stop string ``<spawn_workers>``;
2. *workers*: every director that stopped on ``<spawn_workers>`` gets ``workers_per_block`` workers. Worker ``i``
   sees the director's context (ending in ``<spawn_workers>``) plus ``<worker_i>`` and stops at ``</worker_i>``;
   workers never see each other. Their exact tokens, in order, then ``</spawn_workers>``, are appended to the
   director's context and the next round resumes it.

A trajectory ends when its director stops without spawning, when a budget runs out (:class:`rl.dccot.DCCoTConfig`)
or when it opens more than ``max_spawn_blocks`` blocks. Each phase is exactly one ``generate_fn`` call over all
trajectories (and all their workers).

Prompts are token ids, never re-tokenized text: every context is the concatenation of the prompt ids, the ids the
engine sampled, and the separately encoded injected tags, so the learner sees exactly the tokens the engine was
conditioned on. The text view (``Trajectory.response_text``) is the concatenation of the engine's texts and the
injected tags; it is what rewards grade.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rl.dccot import SPAWN_CLOSE, SPAWN_OPEN, Budget, DCCoTConfig, PathLengths, path_lengths, worker_close, worker_open
from rl.seeding import stable_seed
from rl.types import Rollout, TrainSample

GenerateFn = Callable[[list[list[int]], list[int], list[int], list[list[str]]], list[Rollout]]
"""``generate_fn(prompt_token_ids, seeds, max_tokens, stops) -> rollouts``: one rollout per request, in order.

Request ``k`` samples from the token-id prompt ``prompt_token_ids[k]`` with seed ``seeds[k]``, at most
``max_tokens[k]`` tokens, stopping after the first of the strings ``stops[k]``, which stays in the output (vLLM:
``TokensPrompt`` + ``SamplingParams(stop=..., include_stop_str_in_output=True, max_tokens=..., seed=...)``).
``Rollout.response_text`` must be the decoded text of the sampled tokens (ending at the stop string).
"""

EncodeFn = Callable[[str], list[int]]
"""Token ids of an injected tag, without special tokens (``tokenizer.encode(text, add_special_tokens=False)``)."""

DecodeFn = Callable[[list[int]], str]
"""Text of token ids (``tokenizer.decode(ids)``); used only for a worker cut by the total budget."""

END_REASONS = ("stop", "budget", "director_limit", "spawn_limit")


@dataclass(frozen=True)
class TrajectoryRequest:
    """One DC-CoT response to sample. ``seed`` must differ across the samples of one prompt."""

    prompt_id: str
    prompt_token_ids: list[int]
    seed: int


@dataclass
class Segment:
    """One engine request of a trajectory: injected tokens (if any) followed by what the engine sampled.

    role:               ``"director"`` or ``"worker"``.
    block:              director: index of the segment (0 = before the first spawn block); worker: its block index.
    worker:             1-based worker index (0 for the director).
    prompt_token_ids:   [C] context before this segment: the prompt and everything earlier on this path.
    response_token_ids: [J + G] ``num_injected`` tokens the executor appended, then the G sampled ones. For a
                        worker the injected part is ``<worker_i>``; for a director after a block it is the copy of
                        the block's workers (``<worker_1>`` w1 ... ``<worker_N>`` wN) and ``</spawn_workers>``.
    logprobs:           [J + G] behaviour log-probs; 0.0 on injected tokens.
    loss_mask:          [J + G] 0 on injected tokens, 1 on sampled ones.
    text:               text of ``response_token_ids`` (injected text + the engine's text).
    path_tokens:        tokens counted in the latency measure: sampled tokens plus the opener (worker) or
                        the ``</spawn_workers>`` tokens (director); the copy of the workers does not count.
    finish_reason:      the engine's: ``"stop"`` (EOS or stop string) or ``"length"``.
    """

    role: str
    block: int
    worker: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    text: str
    num_injected: int
    path_tokens: int
    finish_reason: str
    seed: int
    policy_version: int

    @property
    def engine_prompt_token_ids(self) -> list[int]:
        """[C + J] the exact prompt the engine was given."""
        return self.prompt_token_ids + self.response_token_ids[: self.num_injected]

    @property
    def generated_token_ids(self) -> list[int]:
        """[G] the sampled tokens."""
        return self.response_token_ids[self.num_injected :]


@dataclass
class Trajectory:
    """One DC-CoT response. ``segments`` are in generation order: director 0, block 0's workers, director 1, ...

    end_reason: ``"stop"`` (the director stopped without spawning), ``"budget"`` (path or total budget spent),
    ``"director_limit"`` (a director segment hit ``max_director_segment_tokens``) or ``"spawn_limit"`` (the
    director opened one block more than ``max_spawn_blocks``).
    """

    prompt_id: str
    prompt_token_ids: list[int]
    seed: int
    segments: list[Segment] = field(default_factory=list)
    end_reason: str = ""

    @property
    def director_segments(self) -> list[Segment]:
        return [s for s in self.segments if s.role == "director"]

    @property
    def worker_blocks(self) -> list[list[Segment]]:
        """Per spawn block, its worker segments in worker order (fewer than N when a budget dropped some)."""
        blocks: dict[int, list[Segment]] = {}
        for s in self.segments:
            if s.role == "worker":
                blocks.setdefault(s.block, []).append(s)
        return [blocks[b] for b in sorted(blocks)]

    @property
    def response_text(self) -> str:
        """The response as one text, each worker once (the director's view): what rewards grade.

        Director segments carry the copies of earlier blocks; a block after which the director never resumed
        (a budget ran out) is appended from its worker segments, without ``</spawn_workers>``.
        """
        last_director = max((k for k, s in enumerate(self.segments) if s.role == "director"), default=-1)
        return "".join(s.text for s in self.director_segments) + "".join(
            s.text for s in self.segments[last_director + 1 :]
        )

    @property
    def path_lengths(self) -> PathLengths:
        """Longest path and total tokens (``docs/dccot.md`` "Latency measure and budgets")."""
        return path_lengths(
            [s.path_tokens for s in self.director_segments],
            [[w.path_tokens for w in ws] for ws in self.worker_blocks],
        )

    def reward_metadata(self) -> dict[str, int]:
        """What the ``dccot`` reward reads from ``RewardRequest.metadata``."""
        lengths = self.path_lengths
        return {
            "longest_path_tokens": lengths.longest_path_tokens,
            "num_response_tokens": lengths.total_tokens,
            "num_spawn_blocks": lengths.num_spawn_blocks,
        }


def segment_seed(seed: int, block: int, worker: int) -> int:
    """A reproducible 31-bit sampling seed per (trajectory seed, block, worker); workers of a block differ."""
    return stable_seed("dccot", seed, block, worker)


@dataclass
class _State:
    traj: Trajectory
    budget: Budget
    context: list[int]  # prompt + every director segment so far (what the next director request extends)
    injected_ids: list[int] = field(default_factory=list)  # to prepend to the next director segment
    injected_text: str = ""
    injected_path_tokens: int = 0
    blocks_done: int = 0
    done: bool = False


def _check_rollouts(rollouts: list[Rollout], max_tokens: list[int], phase: str) -> None:
    if len(rollouts) != len(max_tokens):
        raise RuntimeError(f"generate_fn returned {len(rollouts)} rollouts for {len(max_tokens)} {phase} requests")
    for ro, limit in zip(rollouts, max_tokens):
        if len(ro.response_token_ids) > limit or len(ro.logprobs) != len(ro.response_token_ids):
            raise RuntimeError(
                f"generate_fn broke its contract in the {phase} phase: {len(ro.response_token_ids)} tokens "
                f"(max_tokens {limit}), {len(ro.logprobs)} log-probs"
            )


def _record_director(
    st: _State, ro: Rollout, seed: int, limit: int, by_cap: bool, round_index: int, cfg: DCCoTConfig,
    max_opener_tokens: int,
) -> bool:
    """Append one director segment; returns whether the trajectory spawns workers now (else it ends)."""
    generated = list(ro.response_token_ids)
    st.budget.charge_sequential(len(generated))
    st.traj.segments.append(
        Segment(
            role="director",
            block=round_index,
            worker=0,
            prompt_token_ids=list(st.context),
            response_token_ids=st.injected_ids + generated,
            logprobs=[0.0] * len(st.injected_ids) + list(ro.logprobs),
            loss_mask=[0] * len(st.injected_ids) + [1] * len(generated),
            text=st.injected_text + ro.response_text,
            num_injected=len(st.injected_ids),
            path_tokens=st.injected_path_tokens + len(generated),
            finish_reason=ro.finish_reason,
            seed=seed,
            policy_version=ro.policy_version,
        )
    )
    st.context = st.context + st.injected_ids + generated
    st.injected_ids, st.injected_text, st.injected_path_tokens = [], "", 0
    if SPAWN_OPEN not in ro.response_text:
        by_cap_now = by_cap and len(generated) == limit
        reason = "stop" if ro.finish_reason == "stop" else ("director_limit" if by_cap_now else "budget")
    elif st.blocks_done >= cfg.max_spawn_blocks:
        reason = "spawn_limit"
    elif st.budget.path_left <= max_opener_tokens or st.budget.total_left == 0:
        reason = "budget"
    else:
        return True
    st.done, st.traj.end_reason = True, reason
    return False


def _record_block(
    st: _State, block: list[Rollout], seeds: list[int], round_index: int, openers: list[list[int]],
    closer: list[int], decode_fn: DecodeFn,
) -> None:
    """Append one block's worker segments (cut to the budgets) and queue their copy for the director."""
    lengths = [len(o) + len(ro.response_token_ids) for o, ro in zip(openers, block)]
    kept = st.budget.cut_block(lengths)
    copy_ids: list[int] = []
    copy_text = ""
    for i, (opener, ro, seed, n_kept) in enumerate(zip(openers, block, seeds, kept), start=1):
        n_generated = n_kept - len(opener)
        if n_generated <= 0 and n_kept < lengths[i - 1]:
            kept = kept[: i - 1]  # the total budget ran out inside this opener: drop the worker
            break
        generated = list(ro.response_token_ids[:n_generated])
        was_cut = n_generated < len(ro.response_token_ids)
        text = decode_fn(generated) if was_cut else ro.response_text
        st.traj.segments.append(
            Segment(
                role="worker",
                block=round_index,
                worker=i,
                prompt_token_ids=list(st.context),
                response_token_ids=list(opener) + generated,
                logprobs=[0.0] * len(opener) + list(ro.logprobs[:n_generated]),
                loss_mask=[0] * len(opener) + [1] * len(generated),
                text=worker_open(i) + text,
                num_injected=len(opener),
                path_tokens=len(opener) + len(generated),
                finish_reason="length" if was_cut else ro.finish_reason,
                seed=seed,
                policy_version=ro.policy_version,
            )
        )
        copy_ids += list(opener) + generated
        copy_text += worker_open(i) + text
    st.blocks_done += 1
    if len(kept) < len(openers) or st.budget.total_left == 0 or st.budget.path_left == 0:
        st.done, st.traj.end_reason = True, "budget"
        return
    # The director resumes on exactly the workers' tokens (closers included) and then </spawn_workers>.
    st.injected_ids = copy_ids + closer
    st.injected_text = copy_text + SPAWN_CLOSE
    st.injected_path_tokens = len(closer)


def run_dccot(
    generate_fn: GenerateFn,
    encode_fn: EncodeFn,
    decode_fn: DecodeFn,
    requests: Sequence[TrajectoryRequest],
    cfg: DCCoTConfig,
) -> list[Trajectory]:
    """Sample one DC-CoT trajectory per request (same order); at most ``2 * max_spawn_blocks + 1`` calls."""
    n_workers = cfg.workers_per_block
    openers = [encode_fn(worker_open(i)) for i in range(1, n_workers + 1)]
    closer = encode_fn(SPAWN_CLOSE)
    if not all(openers) or not closer:
        raise ValueError("encode_fn returned no tokens for a DC-CoT tag; it must encode plain text")
    states = [
        _State(Trajectory(r.prompt_id, list(r.prompt_token_ids), r.seed),
               Budget.from_config(cfg), list(r.prompt_token_ids))
        for r in requests
    ]

    for round_index in range(cfg.max_spawn_blocks + 1):
        # ---- director phase: every live trajectory continues its director until <spawn_workers> or the end
        live, prompts, seeds, limits, cap_bound = [], [], [], [], []
        for st in states:
            if st.done:
                continue
            if st.budget.sequential_left() <= st.injected_path_tokens:
                st.done, st.traj.end_reason = True, "budget"
                continue
            st.budget.charge_sequential(st.injected_path_tokens)
            left = st.budget.sequential_left()
            cap = cfg.max_director_segment_tokens
            live.append(st)
            prompts.append(st.context + st.injected_ids)
            seeds.append(segment_seed(st.traj.seed, round_index, 0))
            limits.append(left if cap is None else min(cap, left))
            cap_bound.append(cap is not None and cap < left)
        if not live:
            break
        rollouts = generate_fn(prompts, seeds, limits, [[SPAWN_OPEN]] * len(live))
        _check_rollouts(rollouts, limits, "director")
        spawned: list[_State] = [
            st
            for st, ro, seed, limit, by_cap in zip(live, rollouts, seeds, limits, cap_bound)
            if _record_director(st, ro, seed, limit, by_cap, round_index, cfg, max(map(len, openers)))
        ]
        if not spawned:
            continue

        # ---- worker phase: all workers of all spawning trajectories in one call
        prompts, seeds, limits = [], [], []
        for st in spawned:
            for i, opener in enumerate(openers, start=1):
                prompts.append(st.context + opener)
                seeds.append(segment_seed(st.traj.seed, round_index, i))
                limits.append(min(cfg.max_worker_tokens, st.budget.path_left - len(opener)))
        stops = [[worker_close(i)] for _ in spawned for i in range(1, n_workers + 1)]
        rollouts = generate_fn(prompts, seeds, limits, stops)
        _check_rollouts(rollouts, limits, "worker")
        for j, st in enumerate(spawned):
            part = slice(j * n_workers, (j + 1) * n_workers)
            _record_block(st, rollouts[part], seeds[part], round_index, openers, closer, decode_fn)
    for st in states:
        if not st.done:  # only reachable if the loop bound is hit, which the spawn limit prevents
            st.done, st.traj.end_reason = True, "spawn_limit"
    return [st.traj for st in states]


def director_sample(traj: Trajectory, advantage: float) -> TrainSample:
    """The director's whole thread as one sample: prompt = the original prompt, response = every director segment
    (copies of the workers and ``</spawn_workers>`` included as context, with loss mask 0). Under causal
    attention each director token then sees exactly what the engine conditioned it on."""
    response: list[int] = []
    logprobs: list[float] = []
    mask: list[int] = []
    for s in traj.director_segments:
        assert s.prompt_token_ids == traj.prompt_token_ids + response, "director segments must chain"
        response += s.response_token_ids
        logprobs += s.logprobs
        mask += s.loss_mask
    return TrainSample(list(traj.prompt_token_ids), response, logprobs, float(advantage), traj.prompt_id, mask)


def to_train_samples(trajectories: Sequence[Trajectory], advantages: Sequence[float]) -> list[TrainSample]:
    """Samples of every trajectory, one advantage per trajectory (broadcast to its director thread and workers).

    Per trajectory, in order: the director thread (:func:`director_sample`), then one sample per worker with
    prompt = the director's context up to ``<spawn_workers>`` and response = ``<worker_i>`` (mask 0) + the worker's
    tokens (mask 1). Every sampled token is trained exactly once; the copies of the workers in the director's
    thread are not.
    """
    if len(advantages) != len(trajectories):
        raise ValueError(f"got {len(advantages)} advantages for {len(trajectories)} trajectories")
    samples: list[TrainSample] = []
    for traj, adv in zip(trajectories, advantages):
        if not traj.segments:
            continue
        samples.append(director_sample(traj, adv))
        for ws in traj.worker_blocks:
            for w in ws:
                samples.append(
                    TrainSample(
                        list(w.prompt_token_ids), list(w.response_token_ids), list(w.logprobs), float(adv),
                        traj.prompt_id, list(w.loss_mask),
                    )
                )
    return samples


def trajectory_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """``rollout/dccot/`` metrics: path lengths, parallelism, spawn blocks, worker lengths and end reasons."""
    n = max(len(trajectories), 1)
    lengths = [t.path_lengths for t in trajectories]
    workers = [w for t in trajectories for ws in t.worker_blocks for w in ws]
    block_min = [min(w.path_tokens for w in ws) for t in trajectories for ws in t.worker_blocks if ws]
    metrics = {
        "rollout/dccot/longest_path_tokens_mean": sum(x.longest_path_tokens for x in lengths) / n,
        "rollout/dccot/total_tokens_mean": sum(x.total_tokens for x in lengths) / n,
        "rollout/dccot/parallelism_mean": sum(x.parallelism for x in lengths) / n,
        "rollout/dccot/spawn_blocks_mean": sum(x.num_spawn_blocks for x in lengths) / n,
        "rollout/dccot/no_spawn_frac": sum(x.num_spawn_blocks == 0 for x in lengths) / n,
        "rollout/dccot/worker_tokens_mean": sum(w.path_tokens for w in workers) / max(len(workers), 1),
        "rollout/dccot/block_min_worker_tokens_mean": sum(block_min) / max(len(block_min), 1),
        "rollout/dccot/worker_truncated_frac": sum(w.finish_reason == "length" for w in workers) / max(len(workers), 1),
        "rollout/dccot/worker_unclosed_frac": sum(worker_close(w.worker) not in w.text for w in workers)
        / max(len(workers), 1),
    }
    for reason in END_REASONS:
        metrics[f"rollout/dccot/end_{reason}_frac"] = sum(t.end_reason == reason for t in trajectories) / n
    return metrics
