"""GDRO: group-DRO controllers over online pass@k difficulty bins (arXiv 2601.19280; code `kishanpb/verl-gdro`).

Two independent controllers share one online difficulty classifier (formulas: ``docs/algorithms.md`` "GDRO"):

- **Prompt-GDRO** (data adversary): exponential weights over bins from EMA-debiased per-bin losses; each prompt's
  advantages are multiplied by its bin's weight, mean-normalized over the batch and capped.
- **Rollout-GDRO** (compute adversary): samples per prompt ``n_b`` chosen per bin by the paper's variance-proxy
  (square-root) law under a fixed mean budget, solved with a clearing shadow price and rounded to integers that
  hold the budget exactly.

Pure Python, no I/O, deterministic. The driver talks to ``GdroController`` once per step, in this order:

1. ``n_per_prompt(ids)`` before generation (uses bin labels from earlier steps: generation has not happened yet);
2. ``sample_weights(ids)`` after grading, to scale advantages (uses labels and scores from earlier steps, as the
   reference code does);
3. ``update(ids, correct, advantages=..., losses=...)`` once, after grading or after the learner step.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rl.metrics import pass_at_k
from rl.schema import StrictModel

STATE_VERSION = 1


class GdroConfig(StrictModel):
    """Prompt-GDRO, Rollout-GDRO and their shared pass@k difficulty classifier.

    Default sources: "script" = the released launch scripts `run_groupdro.sh` / `run_rollout_groupdro.sh` (they
    produced the paper's numbers); "code" = defaults in `kishanpb/verl-gdro`; "paper" = arXiv 2601.19280;
    "ours" = our choice, with the reason in the description.
    """

    _kind: ClassVar[str] = "gdro"

    prompt_gdro: bool = Field(False, description="Scale each prompt's advantages by its bin's Prompt-GDRO weight.")
    rollout_gdro: bool = Field(
        False,
        description="Choose the number of samples per prompt per bin (Rollout-GDRO); off: every prompt gets n_mean.",
    )

    # --- online pass@k difficulty classifier ---
    bin_edges: list[float] = Field(
        [0.1, 0.2, 0.4, 0.6, 0.8, 0.9],
        description="Interior bin boundaries in (0, 1), strictly increasing; m edges give m+1 bins "
        "[0,e1), [e1,e2), ..., [em,1]. Bin 0 = lowest pass@k (hardest). Source: script `passk_edges` of the 6-edge "
        "Prompt-GDRO runs (the code makes 7 bins from them; the scripts' `passk_num_bins=6` is ignored when edges are "
        "given). The 3-bin runs use [0.4, 0.75]. Uniform B bins: [1/B, ..., (B-1)/B].",
    )
    unseen_bin: int = Field(
        0,
        ge=0,
        description="Bin of a prompt id never passed to `update` (code: unseen uid => accuracy 0 => bin 0).",
    )
    passk_k: int | None = Field(
        None,
        ge=1,
        description="Per-visit success c_t(x). None (code): 1 if any of this step's samples is correct. An integer k "
        "(paper's statement, k=8): the unbiased pass@min(k, n) estimate 1 - C(n-c, k)/C(n, k) from the n samples, "
        "which depends less on n when Rollout-GDRO varies it. Default follows the code that produced the paper's runs.",
    )
    passk_window: int = Field(
        100,
        ge=0,
        description="pass@k estimate = mean of c_t over the prompt's last `passk_window` visits; 0 = all visits "
        "(code default). Source: script (100 for the Prompt-GDRO 6-edge runs, 50 for the 3-bin and Rollout runs).",
    )
    hysteresis: float = Field(
        0.03,
        ge=0.0,
        lt=0.5,
        description="Margin delta: a prompt moves up past boundary e only if acc >= e + delta and down only if "
        "acc < e - delta. Source: script (Rollout scripts: 0). The code's uniform-bin downward boundary is one bin "
        "low (a quirk); here every boundary is treated alike.",
    )

    # --- Prompt-GDRO ---
    loss_signal: Literal["pg_loss", "error_rate"] = Field(
        "pg_loss",
        description="Per-prompt loss l(x) fed to Prompt-GDRO. `pg_loss` (paper Eq. 7 / code): the prompt's mean "
        "sequence-mean PPO-clip loss with unweighted advantages, passed to `update(losses=...)` by the learner; "
        "without `losses` it is evaluated at ratio 1 from `advantages` as -mean_j A_ij, which is ~0 for "
        "group-centred advantages (then the weights stay ~uniform). `error_rate` (ours): 1 - mean_j correct_ij, the "
        "bin's loss under the RL objective itself, known at grading time.",
    )
    eta: float = Field(
        0.65, gt=0.0, description="Exponential-weights step eta_q in q(b) ~ exp(eta S(b)). Script; code default 0.1."
    )
    uniform_mix: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="gamma: q = (1-gamma) softmax(eta S) + gamma/B, B = bins present in the batch (code). Script; "
        "code default 0.15.",
    )
    ema_rate: float = Field(
        0.12,
        gt=0.0,
        le=1.0,
        description="beta in S(b) <- (1-beta) S(b) + beta lbar(b); a bin's first observation sets S(b) = lbar(b) "
        "(code). Script (0.4 in the 3- and 10-bin Rollout runs); code default 0.1.",
    )
    score_clip: float | None = Field(
        None,
        gt=0.0,
        description="C in exp(eta clip(S, -C, C)) (paper Eq. 14). None (code): no clip; the paper's value was not "
        "retrieved. Softmax is computed stably either way.",
    )
    loss_norm_by_share: bool = Field(
        True,
        description="Divide a bin's mean loss by its share of the batch's prompts, lbar(b)/qhat(b) (code flag "
        "`loss_norm_by_class`, on in every script; the paper's Eq. 12 uses the plain mean).",
    )
    weight_cap: float = Field(
        15.0,
        ge=1.0,
        description="omega_max: per-sample weights are mean-normalized over the batch and capped here. Script "
        "`max_class_weight`; code default 10.",
    )
    renormalize_after_cap: bool = Field(
        True,
        description="True (ours): water-fill so capped weights still average exactly 1 (the effective learning "
        "rate stays fixed). False (code): clamp after normalizing, so the mean drops below 1 when the cap "
        "binds.",
    )

    # --- Rollout-GDRO (paper Eq. 28-31) ---
    n_mean: int = Field(
        4, ge=1, description="Budget n-bar: mean samples per prompt over a batch (held exactly). Script n = 4."
    )
    n_min: int = Field(
        2,
        ge=1,
        description="Fewest samples per prompt. Code arms start at 2; 1 gives singleton groups with zero advantage.",
    )
    n_max: int = Field(12, ge=1, description="Most samples per prompt. Code: round(3.0 * n_mean) = 12.")
    rollout_ema_rate: float = Field(
        0.4,
        gt=0.0,
        le=1.0,
        description="EMA rate of each bin's variance proxy v(b). Script `rollout_budget_ema_beta` (unused by the "
        "code's bandit allocator, which we replace with the paper's square-root law).",
    )
    rollout_variance_prior: float = Field(
        0.25,
        gt=0.0,
        description="v(b) of a bin never observed (ours): the largest Bernoulli variance p(1-p), so an unexplored "
        "bin is sampled generously.",
    )
    rollout_variance_floor: float = Field(
        1e-4,
        gt=0.0,
        description="Lower bound on v(b) (ours) so the clearing price always exists; bins with v at the floor get "
        "~n_min.",
    )


    @field_validator("bin_edges")
    @classmethod
    def _edges_increasing(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < e < 1.0 for e in v) or any(a >= b for a, b in itertools.pairwise(v)):
            raise ValueError(f"bin_edges must be strictly increasing values in (0, 1), e.g. [0.4, 0.75]; got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> GdroConfig:
        if self.unseen_bin >= self.num_bins:
            raise ValueError(
                f"unseen_bin={self.unseen_bin} but bin_edges give only {self.num_bins} bins (0..{self.num_bins - 1})"
            )
        if not self.n_min <= self.n_mean <= self.n_max:
            raise ValueError(f"need n_min <= n_mean <= n_max, got {self.n_min}, {self.n_mean}, {self.n_max}")
        return self

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) + 1


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------


def entropic_risk(bin_losses: Sequence[float], eta: float) -> float:
    """Entropic GDRO surrogate R = (1/eta) log sum_b exp(eta L_b) (paper Lemma 4.1).

    Bounds: max_b L_b <= R <= max_b L_b + log(B) / eta; its best response over bins is softmax(eta L).
    """
    m = max(bin_losses)
    return m + math.log(sum(math.exp(eta * (x - m)) for x in bin_losses)) / eta


def variance_proxy(shares: Sequence[float], variances: Sequence[float], n: Sequence[float]) -> float:
    """VarProxy(n) = sum_b q_b v_b / n_b (paper Eq. 28), which the square-root law minimizes at fixed sum_b q_b n_b."""
    return sum(q * v / nb for q, v, nb in zip(shares, variances, n))


def cap_mean_normalized(weights: Sequence[float], cap: float, renormalize: bool = True) -> list[float]:
    """Scale positive weights to mean 1, then cap at ``cap`` (>= 1).

    ``renormalize``: find s with mean(min(s w, cap)) = 1 (water-filling: the excess of capped samples goes to the
    others in proportion); otherwise plain min(w / mean(w), cap), whose mean is below 1 when the cap binds.
    """
    total = sum(weights)
    size = len(weights)
    w = [x * size / total for x in weights]
    if not renormalize:
        return [min(x, cap) for x in w]
    capped = [False] * size
    scale = 1.0
    for _ in range(size):
        free = sum(x for x, c in zip(w, capped) if not c)
        if free == 0.0:
            break
        scale = (size - cap * sum(capped)) / free
        grown = [c or scale * x > cap for x, c in zip(w, capped)]
        if grown == capped:
            break
        capped = grown
    return [cap if c else scale * x for x, c in zip(w, capped)]


def largest_remainder(targets: Sequence[float], total: int, lo: int, hi: int) -> list[int]:
    """Integers n_i in [lo, hi] with sum exactly ``total``, each n_i in {floor(t_i), ceil(t_i)} when feasible.

    Start from floor(t_i) clamped to [lo, hi]; hand the missing units (+1 each) to the largest fractional parts,
    or take surplus units (-1 each) from the smallest, ties to the earlier index; repeat passes if one pass is not
    enough (targets that do not sum to ``total``). Requires lo * len <= total <= hi * len.
    """
    size = len(targets)
    assert lo * size <= total <= hi * size, (lo, hi, size, total)
    base = [min(max(math.floor(t), lo), hi) for t in targets]
    frac = [t - math.floor(t) for t in targets]
    rem = total - sum(base)
    step = 1 if rem > 0 else -1
    order = sorted(range(size), key=lambda i: (-frac[i], i) if step > 0 else (frac[i], i))
    while rem != 0:
        for i in order:
            if rem == 0:
                break
            if lo <= base[i] + step <= hi:
                base[i] += step
                rem -= step
    return base


def per_bin_mean(bins: Sequence[int], values: Sequence[float]) -> dict[int, float]:
    """Mean of ``values`` over the entries of each bin: {bin: mean}. Only bins with entries appear."""
    sums: dict[int, float] = {}
    counts: Counter[int] = Counter()
    for b, v in zip(bins, values):
        sums[b] = sums.get(b, 0.0) + v
        counts[b] += 1
    return {b: sums[b] / counts[b] for b in sorted(sums)}


# ---------------------------------------------------------------------------------------------------------------
# Online pass@k difficulty classifier
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _PromptRecord:
    """One prompt's classifier state: its bin and its per-visit successes (window) or their running sum (all)."""

    bin: int
    history: list[float] = field(default_factory=list)  # last `window` values of c_t (window > 0)
    total: float = 0.0  # sum of all c_t (window == 0)
    visits: int = 0


class PassKClassifier:
    """Online pass@k bins keyed by prompt id, with hysteresis.

    acc(x) = mean of c_t(x) over the last H visits (all visits if H = 0); raw bin = #edges <= acc, so the bins are
    [0,e1), [e1,e2), ..., [em,1]. From previous bin p the new bin is bin(acc - delta) if that is above p,
    else bin(acc + delta) if that is below p (strictly: acc < e - delta), else p. A first visit takes the raw bin.
    """

    def __init__(self, cfg: GdroConfig) -> None:
        self.edges = list(cfg.bin_edges)
        self.window = cfg.passk_window
        self.delta = cfg.hysteresis
        self.k = cfg.passk_k
        self.default_bin = cfg.unseen_bin
        self.records: dict[str, _PromptRecord] = {}

    def _raw_bin(self, acc: float) -> int:
        return bisect.bisect_right(self.edges, acc)

    def accuracy(self, prompt_id: str) -> float | None:
        """The current pass@k estimate of a prompt, or None if never seen."""
        r = self.records.get(prompt_id)
        if r is None:
            return None
        if self.window > 0:
            return sum(r.history) / len(r.history)
        return r.total / r.visits

    def bin_of(self, prompt_id: str) -> int:
        r = self.records.get(prompt_id)
        return self.default_bin if r is None else r.bin

    def update(self, prompt_id: str, num_correct: int, num_samples: int) -> int:
        """Record one visit (this step's samples of the prompt) and return its new bin. No samples: no-op."""
        if not 0 <= num_correct <= num_samples:
            raise ValueError(
                f"prompt {prompt_id!r}: need 0 <= num_correct <= num_samples, got {num_correct}/{num_samples}"
            )
        if num_samples == 0:
            return self.bin_of(prompt_id)
        if self.k is None:
            c = 1.0 if num_correct > 0 else 0.0
        else:
            c = pass_at_k(num_samples, num_correct, min(self.k, num_samples))
        r = self.records.get(prompt_id)
        first = r is None
        if r is None:
            r = self.records[prompt_id] = _PromptRecord(bin=self.default_bin)
        r.visits += 1
        if self.window > 0:
            r.history.append(c)
            del r.history[: -self.window]
        else:
            r.total += c
        acc = self.accuracy(prompt_id)
        assert acc is not None
        if first:
            r.bin = self._raw_bin(acc)
        else:
            up, down = self._raw_bin(acc - self.delta), self._raw_bin(acc + self.delta)
            if up > r.bin:
                r.bin = up
            elif down < r.bin:
                r.bin = down
        return r.bin

    def bin_counts(self) -> list[int]:
        """Number of seen prompts currently in each bin."""
        counts = [0] * (len(self.edges) + 1)
        for r in self.records.values():
            counts[r.bin] += 1
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {pid: [r.bin, list(r.history), r.total, r.visits] for pid, r in self.records.items()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.records = {
            pid: _PromptRecord(bin=int(b), history=[float(x) for x in h], total=float(t), visits=int(v))
            for pid, (b, h, t, v) in d.items()
        }


# ---------------------------------------------------------------------------------------------------------------
# Prompt-GDRO
# ---------------------------------------------------------------------------------------------------------------


class PromptGdro:
    """EMA-debiased exponential weights over bins.

    S(b) <- (1-beta) S(b) + beta lbar(b)  (first observation: S(b) = lbar(b); bins absent from a step keep S)
    q(b)  = (1-gamma) exp(eta clip(S(b), -C, C)) / sum_j exp(eta clip(S(j), -C, C)) + gamma / |present|
    over the bins present in the batch (a never-observed bin scores 0). Sample weights: q of the sample's bin,
    mean-normalized over the batch, capped at omega_max (see ``cap_mean_normalized``).
    """

    def __init__(self, cfg: GdroConfig) -> None:
        self.cfg = cfg
        self.scores: list[float | None] = [None] * cfg.num_bins

    def update(self, bin_losses: dict[int, float]) -> None:
        """EMA step with this step's per-bin loss signal lbar(b) (already share-normalized if configured)."""
        beta = self.cfg.ema_rate
        for b, loss in bin_losses.items():
            s = self.scores[b]
            self.scores[b] = loss if s is None else (1.0 - beta) * s + beta * loss

    def probs(self, present: Sequence[int]) -> dict[int, float]:
        """q(b) over the given bins (which sum to 1)."""
        bins = sorted(set(present))
        c = self.cfg.score_clip
        logits = []
        for b in bins:
            s = self.scores[b] or 0.0
            if c is not None:
                s = min(max(s, -c), c)
            logits.append(self.cfg.eta * s)
        m = max(logits)
        w = [math.exp(x - m) for x in logits]
        z = sum(w)
        g = self.cfg.uniform_mix
        return {b: (1.0 - g) * wb / z + g / len(bins) for b, wb in zip(bins, w)}

    def weights(self, bins: Sequence[int]) -> list[float]:
        """Per-entry advantage weights for entries in ``bins``: mean 1 over the list, each <= weight_cap."""
        if not bins:
            return []
        q = self.probs(bins)
        return cap_mean_normalized([q[b] for b in bins], self.cfg.weight_cap, self.cfg.renormalize_after_cap)


# ---------------------------------------------------------------------------------------------------------------
# Rollout-GDRO (square-root law with a clearing shadow price)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Allocation:
    """One batch's Rollout-GDRO decision.

    n:            [P] int samples per prompt, sum == n_mean * P, each in [n_min, n_max].
    bin_targets:  {bin: continuous n_b} for the bins present.
    shadow_price: mu with n_b = clip(sqrt(v_b / mu), n_min, n_max); None when every prompt gets n_mean trivially.
    """

    n: list[int]
    bin_targets: dict[int, float]
    shadow_price: float | None


class RolloutGdro:
    """Samples per prompt by bin: minimize VarProxy = sum_b q_b v_b / n_b s.t. sum_b q_b n_b = n_mean, n_b in [lo, hi].

    KKT: n_b(mu) = clip(sqrt(v_b / mu), lo, hi) with the shadow price mu at which the batch's demand
    sum_b count_b n_b(mu) equals n_mean * P. Without binding clips this is the square-root law
    n_b = n_mean sqrt(v_b) / sum_j q_j sqrt(v_j) (paper Eq. 30). v_b = EMA of the bin's mean per-prompt reward
    variance (unbiased c(n-c)/(n(n-1)) from binary correctness).
    """

    def __init__(self, cfg: GdroConfig) -> None:
        self.cfg = cfg
        self.variances: list[float | None] = [None] * cfg.num_bins

    def update(self, bin_variances: dict[int, float]) -> None:
        beta = self.cfg.rollout_ema_rate
        for b, v in bin_variances.items():
            s = self.variances[b]
            self.variances[b] = v if s is None else (1.0 - beta) * s + beta * v

    def variance(self, b: int) -> float:
        v = self.variances[b]
        return max(self.cfg.rollout_variance_prior if v is None else v, self.cfg.rollout_variance_floor)

    def bin_targets(self, counts: dict[int, int]) -> tuple[dict[int, float], float | None]:
        """Continuous n_b for bins with counts > 0 and the clearing price mu (exact, via the breakpoints of demand)."""
        lo, hi, budget = self.cfg.n_min, self.cfg.n_max, self.cfg.n_mean * sum(counts.values())
        if lo == hi or len(counts) == 1:
            return {b: float(self.cfg.n_mean) for b in counts}, None
        v = {b: self.variance(b) for b in counts}

        def demand(mu: float) -> float:
            return sum(c * min(max(math.sqrt(v[b] / mu), lo), hi) for b, c in counts.items())

        # demand(mu) is non-increasing, = hi * P at the smallest breakpoint and lo * P at the largest.
        breaks = sorted({v[b] / hi**2 for b in v} | {v[b] / lo**2 for b in v})
        if demand(breaks[0]) <= budget:  # n_mean == hi
            mu = breaks[0]
        elif demand(breaks[-1]) >= budget:  # n_mean == lo
            mu = breaks[-1]
        else:
            j = next(i for i in range(1, len(breaks)) if demand(breaks[i]) <= budget)
            mid = math.sqrt(breaks[j - 1] * breaks[j])
            at_lo = [b for b in v if math.sqrt(v[b] / mid) <= lo]
            at_hi = [b for b in v if math.sqrt(v[b] / mid) >= hi]
            free = [b for b in v if b not in at_lo and b not in at_hi]
            rest = budget - lo * sum(counts[b] for b in at_lo) - hi * sum(counts[b] for b in at_hi)
            root_sum = sum(counts[b] * math.sqrt(v[b]) for b in free)
            # demand is continuous and strictly falls across (breaks[j-1], breaks[j]), so some bin is unclipped there
            assert free and rest > 0, (free, rest)
            targets = {b: float(lo) for b in at_lo} | {b: float(hi) for b in at_hi}
            targets |= {b: rest * math.sqrt(v[b]) / root_sum for b in free}
            return targets, (root_sum / rest) ** 2
        return {b: min(max(math.sqrt(v[b] / mu), lo), hi) for b in counts}, mu

    def allocate(self, bins: Sequence[int]) -> Allocation:
        """Integer samples per prompt for prompts in ``bins``; sum is exactly n_mean * len(bins) (largest remainder)."""
        if not bins:
            return Allocation([], {}, None)
        targets, mu = self.bin_targets(dict(Counter(bins)))
        n = largest_remainder([targets[b] for b in bins], self.cfg.n_mean * len(bins), self.cfg.n_min, self.cfg.n_max)
        return Allocation(n, targets, mu)


# ---------------------------------------------------------------------------------------------------------------
# Facade used by the driver
# ---------------------------------------------------------------------------------------------------------------


def _bernoulli_variance(correct: Sequence[bool]) -> float | None:
    """Unbiased p(1-p) from n >= 2 binary outcomes: c (n - c) / (n (n - 1)); None for n < 2."""
    n, c = len(correct), sum(bool(x) for x in correct)
    return None if n < 2 else c * (n - c) / (n * (n - 1))


class GdroController:
    """The driver's handle on the classifier and both controllers; see the module docstring for the call order."""

    def __init__(self, cfg: GdroConfig) -> None:
        self.cfg = cfg
        self.classifier = PassKClassifier(cfg)
        self.prompt = PromptGdro(cfg)
        self.rollout = RolloutGdro(cfg)
        self._last_alloc: Allocation | None = None
        self._last_alloc_bins: list[int] = []
        self._last_weight_by_bin: dict[int, float] = {}
        self._last_batch_counts: list[int] = [0] * cfg.num_bins

    def n_per_prompt(self, prompt_ids: list[str]) -> list[int]:
        """Samples to generate for each prompt: n_mean each when Rollout-GDRO is off."""
        if not self.cfg.rollout_gdro:
            return [self.cfg.n_mean] * len(prompt_ids)
        bins = [self.classifier.bin_of(p) for p in prompt_ids]
        self._last_alloc = self.rollout.allocate(bins)
        self._last_alloc_bins = bins
        return list(self._last_alloc.n)

    def sample_weights(self, prompt_ids: list[str]) -> list[float]:
        """Advantage weight per entry: 1.0 when Prompt-GDRO is off.

        Normalized to mean 1 over the given list: pass one id per prompt, or one per sample (ids repeated) to
        normalize over samples when prompts have different numbers of samples (the code normalizes over samples).
        """
        if not self.cfg.prompt_gdro:
            return [1.0] * len(prompt_ids)
        bins = [self.classifier.bin_of(p) for p in prompt_ids]
        w = self.prompt.weights(bins)
        self._last_weight_by_bin = dict(zip(bins, w))
        return w

    def update(
        self,
        prompt_ids: list[str],
        correct: list[list[bool]],
        advantages: list[list[float]] | None = None,
        losses: list[float] | None = None,
    ) -> None:
        """One step's feedback: per prompt, the correctness of each sample (variable length).

        Classifies first (so a prompt's loss counts for the bin its newest accuracy puts it in, as in the paper's
        g_t), then feeds per-bin signals to the enabled controllers. ``losses``: per-prompt l(x) from the learner
        for ``loss_signal="pg_loss"``; without it, -mean_j A_ij from ``advantages`` is used. Prompts with no
        samples are skipped.
        """
        if len(correct) != len(prompt_ids):
            raise ValueError(f"got {len(correct)} correctness lists for {len(prompt_ids)} prompts")
        for name, other in (("advantages", advantages), ("losses", losses)):
            if other is not None and len(other) != len(prompt_ids):
                raise ValueError(f"got {len(other)} {name} entries for {len(prompt_ids)} prompts")
        keep = [i for i, c in enumerate(correct) if len(c) > 0]
        # every check that can raise comes before the first state change
        per_prompt = [self._prompt_loss(i, correct, advantages, losses) for i in keep] if self.cfg.prompt_gdro else []
        bins = {i: self.classifier.update(prompt_ids[i], sum(map(bool, correct[i])), len(correct[i])) for i in keep}
        self._last_batch_counts = [0] * self.cfg.num_bins
        for b in bins.values():
            self._last_batch_counts[b] += 1

        if self.cfg.prompt_gdro and keep:
            bin_loss = per_bin_mean([bins[i] for i in keep], per_prompt)
            if self.cfg.loss_norm_by_share:
                bin_loss = {b: x * len(keep) / self._last_batch_counts[b] for b, x in bin_loss.items()}
            self.prompt.update(bin_loss)

        if self.cfg.rollout_gdro:
            var = {i: _bernoulli_variance(correct[i]) for i in keep}
            usable = [i for i in keep if var[i] is not None]
            self.rollout.update(per_bin_mean([bins[i] for i in usable], [var[i] for i in usable]))  # type: ignore[misc]

    def _prompt_loss(
        self,
        i: int,
        correct: list[list[bool]],
        advantages: list[list[float]] | None,
        losses: list[float] | None,
    ) -> float:
        if self.cfg.loss_signal == "error_rate":
            return 1.0 - sum(map(bool, correct[i])) / len(correct[i])
        if losses is not None:
            return float(losses[i])
        if advantages is not None:
            a = advantages[i]
            return -sum(a) / len(a) if a else 0.0
        raise ValueError(
            "loss_signal='pg_loss' needs per-prompt `losses` from the learner (or `advantages`) in "
            "GdroController.update; or set loss_signal='error_rate'"
        )

    def metrics(self) -> dict[str, float]:
        """Flat `gdro/...` metrics of the latest calls; per-bin keys only where the value is defined."""
        return {**self.state_metrics(), **self.decision_metrics()}

    def state_metrics(self) -> dict[str, float]:
        """What the latest ``update`` left: classifier size, the batch's bins, Prompt-GDRO's bin scores and
        risk, Rollout-GDRO's variance estimates."""
        m: dict[str, float] = {"gdro/classifier/prompts_seen": float(len(self.classifier.records))}
        for b, c in enumerate(self._last_batch_counts):
            m[f"gdro/batch/prompts_bin{b}"] = float(c)
        if self.cfg.prompt_gdro:
            observed = [s for s in self.prompt.scores if s is not None]
            for b, s in enumerate(self.prompt.scores):
                if s is not None:
                    m[f"gdro/prompt/score_bin{b}"] = s
            if observed:
                m["gdro/prompt/entropic_risk"] = entropic_risk(observed, self.cfg.eta)
        if self.cfg.rollout_gdro:
            for b in range(self.cfg.num_bins):
                m[f"gdro/rollout/variance_bin{b}"] = self.rollout.variance(b)
        return m

    def decision_metrics(self) -> dict[str, float]:
        """What the latest ``n_per_prompt`` / ``sample_weights`` decided: advantage weight per bin, realized
        sample budget, shadow price, mean n per bin. In async mode a batch is prepared before the previous
        step's update, so the driver reads these when the batch is prepared, not after the update."""
        m: dict[str, float] = {}
        if self.cfg.prompt_gdro:
            for b, w in sorted(self._last_weight_by_bin.items()):
                m[f"gdro/prompt/weight_bin{b}"] = w
        if self.cfg.rollout_gdro:
            alloc = self._last_alloc
            if alloc is not None and alloc.n:
                m["gdro/rollout/budget_realized"] = sum(alloc.n) / len(alloc.n)
                m["gdro/rollout/shadow_price"] = alloc.shadow_price if alloc.shadow_price is not None else 0.0
                for b, n_b in per_bin_mean(self._last_alloc_bins, [float(x) for x in alloc.n]).items():
                    m[f"gdro/rollout/n_mean_bin{b}"] = n_b
        return m

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state; restoring it reproduces every later decision exactly."""
        return {
            "version": STATE_VERSION,
            "num_bins": self.cfg.num_bins,
            "classifier": self.classifier.state_dict(),
            "prompt_scores": list(self.prompt.scores),
            "rollout_variances": list(self.rollout.variances),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"GDRO state version {d.get('version')!r}, expected {STATE_VERSION}")
        if d["num_bins"] != self.cfg.num_bins:
            raise ValueError(
                f"GDRO state has {d['num_bins']} bins but bin_edges give {self.cfg.num_bins}: "
                "resume with the bin_edges of the saved run"
            )
        self.classifier.load_state_dict(d["classifier"])
        self.prompt.scores = [None if s is None else float(s) for s in d["prompt_scores"]]
        self.rollout.variances = [None if v is None else float(v) for v in d["rollout_variances"]]
