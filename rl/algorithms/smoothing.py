"""Advantage shaping applied after the estimator: differential smoothing (DS-GRPO).

Differential smoothing (Gai et al., arXiv 2511.19942; ``docs/algorithms.md`` "Differential smoothing") adds a
log-probability term to each sample's advantage, with opposite signs for correct and incorrect samples:

    A_DS = A - gamma_pos * log pi_old(y|x)   if the sample is correct   (rare correct answers gain)
         = A + gamma_neg * log pi_old(y|x)   otherwise                  (unlikely wrong answers lose more)

``log pi_old`` is the rollout policy's log-prob of the response, detached. ``cfg.ds_logprob_norm``
picks the sequence sum or the per-token mean (sum / length); the paper's convention is unverified.
Selected with ``AlgorithmConfig.advantage_shaping``, a name in the ``ADVANTAGE_SHAPING`` registry whose entries
share ``differential_smoothing``'s signature; ``shape_advantages`` is the one entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rl.registry import Registry

if TYPE_CHECKING:
    from rl.algorithms.config import AlgorithmConfig

ShapingFn = Callable[[Tensor, Tensor, Tensor, Tensor, "AlgorithmConfig"], tuple[Tensor, dict[str, float]]]

ADVANTAGE_SHAPING: Registry[ShapingFn] = Registry(
    "advantage shaping",
    capabilities={
        "needs_sequence_logprobs": False,  # reads seq_logprob_sum / lengths (else they may be placeholders)
    },
)


@ADVANTAGE_SHAPING.register("differential_smoothing", needs_sequence_logprobs=True)
def differential_smoothing(
    advantages: Tensor, correct: Tensor, seq_logprob_sum: Tensor, lengths: Tensor, cfg: AlgorithmConfig
) -> tuple[Tensor, dict[str, float]]:
    """DS-GRPO advantages and their metrics.

    advantages:      [N] float, the estimator's per-sample advantages (e.g. GRPO).
    correct:         [N] bool, the verifier's binary outcome (not a shaped reward).
    seq_logprob_sum: [N] float, sum of the response's token log-probs under the rollout policy (detached).
    lengths:         [N] number of loss tokens of each response; divides the sum when
                     ``cfg.ds_logprob_norm == "mean"`` (a length of 0 counts as 1). Unused for ``"sum"``.

    Returns ([N] shaped advantages, detached, same dtype as ``advantages``; metrics):

    - ``ds/term_abs_mean``: mean of |A_DS - A| = |gamma log pi|.
    - ``ds/adv_abs_mean``: mean of |A| before shaping.
    - ``ds/term_to_adv_ratio``: mean of |gamma log pi| / |A| over samples with A != 0 (0 if there are
      none). Around 1 or more, the smoothing term swamps the task signal (the scale problem of the summed log-prob).

    All-correct (or all-wrong) groups have A = 0 but still get the smoothing term, so filtering such
    groups out (DAPO dynamic sampling) removes part of the DS signal.
    """
    n = advantages.shape
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-D [N], got {tuple(n)}")
    for name, t in (("correct", correct), ("seq_logprob_sum", seq_logprob_sum), ("lengths", lengths)):
        if t.shape != n:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(n)}")
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor (the verifier's outcome), got {correct.dtype}")

    adv = advantages.detach()
    logpi = seq_logprob_sum.detach().to(adv.dtype)
    if cfg.ds_logprob_norm == "mean":
        logpi = logpi / lengths.to(adv.dtype).clamp(min=1)
    term = torch.where(correct, -cfg.ds_gamma_pos * logpi, cfg.ds_gamma_neg * logpi)
    shaped = adv + term

    nonzero = adv != 0
    ratio = (term.abs()[nonzero] / adv.abs()[nonzero]).mean() if nonzero.any() else adv.new_zeros(())
    metrics = {
        "ds/term_abs_mean": float(term.abs().mean()) if adv.numel() else 0.0,
        "ds/adv_abs_mean": float(adv.abs().mean()) if adv.numel() else 0.0,
        "ds/term_to_adv_ratio": float(ratio),
    }
    return shaped, metrics


@ADVANTAGE_SHAPING.register("none")
def no_shaping(
    advantages: Tensor, correct: Tensor, seq_logprob_sum: Tensor, lengths: Tensor, cfg: AlgorithmConfig
) -> tuple[Tensor, dict[str, float]]:
    """The estimator's advantages unchanged, no metrics; reads none of the other inputs."""
    return advantages, {}


def shape_advantages(
    advantages: Tensor, correct: Tensor, seq_logprob_sum: Tensor, lengths: Tensor, cfg: AlgorithmConfig
) -> tuple[Tensor, dict[str, float]]:
    """Apply ``cfg.advantage_shaping`` (arguments as in ``differential_smoothing``); ``"none"`` returns the
    advantages unchanged and no metrics, without reading the other inputs (see
    ``AlgorithmConfig.needs_sequence_logprobs``)."""
    return ADVANTAGE_SHAPING.get(cfg.advantage_shaping)(advantages, correct, seq_logprob_sum, lengths, cfg)
