"""Configuration of the policy-optimization algorithm: advantage estimator, policy loss, aggregation, KL.

Variants are parameters, not classes (formulas: ``docs/algorithms.md`` "Token ratio and clipped losses",
"GRPO and RLOO advantages", "DAPO"):

- GRPO (verl defaults): the defaults below.
- Dr. GRPO: ``norm_adv_by_std=False``, ``loss_agg_mode="seq-mean-token-sum-norm"``,
  ``loss_agg_const_len=<max_response_tokens>``.
- DAPO loss: ``clip_eps_high=0.28``, ``dual_clip_c=10.0``, ``loss_agg_mode="token-mean"``, ``kl_coef=0``.
- GSPO: ``policy_loss="gspo"``, ``clip_eps_low=3e-4``, ``clip_eps_high=4e-4``,
  ``loss_agg_mode="seq-mean-token-mean"``.
- SAPO (``docs/algorithms.md`` "SAPO"): ``policy_loss="sapo"``, ``sapo_tau_pos=1.0``, ``sapo_tau_neg=1.05``,
  ``loss_agg_mode="seq-mean-token-mean"`` (verl forces that mode for SAPO; we use whatever is configured).
- Differential smoothing / DS-GRPO (``docs/algorithms.md`` "Differential smoothing"):
  ``advantage_shaping="differential_smoothing"`` on top of any estimator and loss, with ``ds_gamma_pos``,
  ``ds_gamma_neg`` and ``ds_logprob_norm`` (``rl.algorithms.smoothing``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rl.algorithms.advantages import ADVANTAGE_ESTIMATORS
from rl.algorithms.losses import POLICY_LOSSES
from rl.algorithms.smoothing import ADVANTAGE_SHAPING
from rl.schema import StrictModel

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]


class AlgorithmConfig(StrictModel):
    """Advantage estimation, policy loss, loss aggregation and KL regularization of one run."""

    _kind: ClassVar[str] = "algorithm"

    advantage_estimator: str = Field(
        "grpo",
        description="Name in `ADVANTAGE_ESTIMATORS` (`grpo`, `rloo`). Dr. GRPO is `grpo` with "
        "`norm_adv_by_std=False`.",
    )
    norm_adv_by_std: bool = Field(
        True,
        description="Divide group-centred rewards by the group std (GRPO). False gives Dr. GRPO's "
        "A = R - mean. Read only by estimators that normalize (`grpo`); `rloo` ignores it.",
    )
    std_mode: Literal["sample", "population"] = Field(
        "sample",
        description="Group std convention. `sample`: Bessel-corrected (n-1), like verl's torch.std; "
        "rewards [1,0,0,1] give A = +-0.866. `population`: 1/n, as DeepSeekMath/GDRO write it; "
        "[1,0,0,1] give A = +-1.0.",
    )
    adv_eps: float = Field(1e-6, ge=0.0, description="Added to the group std before dividing: A = (R-mean)/(std+eps).")

    advantage_shaping: str = Field(
        "none",
        description="Name in `ADVANTAGE_SHAPING`: a per-sample change to the estimator's advantages before the loss. "
        "`differential_smoothing` (DS-GRPO, arXiv 2511.19942): A - ds_gamma_pos * log pi_old(y|x) for "
        "correct samples, A + ds_gamma_neg * log pi_old(y|x) otherwise; needs sequence log-probs.",
    )
    ds_gamma_pos: float = Field(
        0.01,
        ge=0.0,
        description="Differential smoothing on correct samples: a diversity bonus -gamma * log pi (rare correct "
        "answers get more credit). 0.01 is a third-party fork's default; the paper's value is unverified.",
    )
    ds_gamma_neg: float = Field(
        0.01,
        ge=0.0,
        description="Differential smoothing on incorrect samples: +gamma * log pi (unlikely wrong answers are "
        "pushed down harder). 0.01 is a third-party fork's default; the paper's value is unverified.",
    )
    ds_logprob_norm: Literal["sum", "mean"] = Field(
        "mean",
        description="The log pi(y|x) of differential smoothing. `sum`: sequence log-prob (sum over response "
        "tokens), as the formula is written; O(-length), so gamma 0.01 on a 4000-token answer adds ~10 to "
        "the advantage. `mean`: per-token mean log-prob (sum / length), bounded whatever the length. Default "
        "`mean` for that reason; whether the paper length-normalizes is UNVERIFIED. A gamma tuned for one "
        "mode does not transfer to the other; watch `ds/term_to_adv_ratio`.",
    )

    policy_loss: str = Field(
        "ppo_clip",
        description="Name in `POLICY_LOSSES`: `ppo_clip` (token ratio, decoupled clip, optional dual "
        "clip), `gspo` (GSPO-token: sequence-level geometric-mean ratio) or `sapo` (soft sigmoid gate on the "
        "token ratio, no clip) or `cispo` (REINFORCE with a clipped, detached importance weight; DC-CoT stages 2+).",
    )
    clip_eps_low: float = Field(
        0.2, ge=0.0, lt=1.0, description="Lower clip: ratio is clipped at 1 - clip_eps_low. GSPO uses ~3e-4."
    )
    clip_eps_high: float = Field(
        0.2,
        ge=0.0,
        description="Upper clip: ratio is clipped at 1 + clip_eps_high. DAPO clip-higher: 0.28; GSPO ~4e-4 "
        "(a geometric-mean ratio moves far less than a token ratio: never reuse 0.2 for GSPO).",
    )
    dual_clip_c: float | None = Field(
        None,
        description="Dual clip for negative advantages: the loss of a token with A<0 is capped at -A*c. "
        "Must be > 1 when set (verl default 3.0, DAPO 10.0). None disables it. Ignored by `gspo` and `sapo`.",
    )
    sapo_tau_pos: float = Field(
        1.0,
        gt=0.0,
        description="SAPO gate temperature for tokens with A > 0: f(r) = sigmoid(tau (r - 1)) * 4 / tau. "
        "Larger tau shrinks the gradient of off-policy tokens faster. Used only by `sapo`.",
    )
    sapo_tau_neg: float = Field(
        1.05,
        gt=0.0,
        description="SAPO gate temperature for tokens with A <= 0; must be >= sapo_tau_pos (negative "
        "advantages are the larger source of instability). Used only by `sapo`.",
    )
    cispo_weight_max: float = Field(
        5.0,
        gt=0.0,
        description="CISPO: the detached importance weight is clamp(r, 0, cispo_weight_max) (DC-CoT stages 2+: 5). "
        "An absolute bound on the ratio, not 1 + eps. Used only by `cispo`.",
    )
    loss_agg_mode: LossAggMode = Field(
        "token-mean",
        description="How per-token losses become one scalar. `token-mean`: over all loss tokens of the "
        "optimizer step (DAPO). `seq-mean-token-mean`: mean over sequences of the per-sequence token mean "
        "(original GRPO, GSPO). `seq-mean-token-sum`: mean over sequences of the token sum. "
        "`seq-mean-token-sum-norm`: token sum of the step / loss_agg_const_len (Dr. GRPO).",
    )
    loss_agg_const_len: int | None = Field(
        None,
        gt=0,
        description="The constant L of `seq-mean-token-sum-norm` (e.g. max_response_tokens). Required for that "
        "mode, unused otherwise.",
    )

    kl_coef: float = Field(0.0, ge=0.0, description="KL coefficient beta. 0 disables KL and reference log-probs.")
    kl_estimator: KLEstimator = Field(
        "k3",
        description="Per-token KL estimator: k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = "
        "exp(ref - logp) - (ref - logp) - 1 (low-variance, >= 0; GRPO's choice).",
    )
    kl_in: Literal["loss", "reward"] = Field(
        "loss",
        description="`loss`: add kl_coef * agg(KL) to the actor loss (GRPO style). `reward`: subtract "
        "kl_coef * sum_t KL from each sample's reward before advantages (PPO style; use k1).",
    )
    log_ratio_clamp: float = Field(
        20.0,
        gt=0.0,
        description="Log importance ratios are clamped to +-log_ratio_clamp before exp (verl uses 20) so a "
        "stale or broken token cannot overflow; clamped tokens get no gradient.",
    )


    @field_validator("advantage_estimator")
    @classmethod
    def _known_estimator(cls, v: str) -> str:
        return ADVANTAGE_ESTIMATORS.check(v)

    @field_validator("policy_loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        return POLICY_LOSSES.check(v)

    @field_validator("advantage_shaping")
    @classmethod
    def _known_shaping(cls, v: str) -> str:
        return ADVANTAGE_SHAPING.check(v)

    @field_validator("dual_clip_c")
    @classmethod
    def _dual_clip_above_one(cls, v: float | None) -> float | None:
        if v is not None and not v > 1.0:
            raise ValueError(f"dual_clip_c must be > 1 (e.g. 3.0) or null to disable it, got {v}")
        return v

    @model_validator(mode="after")
    def _sapo_tau_order(self) -> AlgorithmConfig:
        if self.sapo_tau_neg < self.sapo_tau_pos:
            raise ValueError(
                f"sapo_tau_neg ({self.sapo_tau_neg}) must be >= sapo_tau_pos ({self.sapo_tau_pos}): negative "
                "advantages need the faster-decaying gate (defaults 1.05 and 1.0)"
            )
        return self

    @model_validator(mode="after")
    def _const_len_for_norm_mode(self) -> AlgorithmConfig:
        if self.loss_agg_mode == "seq-mean-token-sum-norm" and self.loss_agg_const_len is None:
            raise ValueError(
                "loss_agg_mode 'seq-mean-token-sum-norm' divides by a constant length: set loss_agg_const_len "
                "(e.g. to max_response_tokens)"
            )
        return self

    @property
    def needs_ref_logprobs(self) -> bool:
        """Whether the learner must compute reference-policy log-probs for this configuration."""
        return (
            self.kl_coef > 0
            or ADVANTAGE_ESTIMATORS.capabilities(self.advantage_estimator)["needs_ref_logprobs"]
            or POLICY_LOSSES.capabilities(self.policy_loss)["needs_ref_logprobs"]
        )

    @property
    def needs_sequence_logprobs(self) -> bool:
        """Whether advantages need each sample's sequence log-prob under the rollout policy."""
        return (
            ADVANTAGE_SHAPING.capabilities(self.advantage_shaping)["needs_sequence_logprobs"]
            or ADVANTAGE_ESTIMATORS.capabilities(self.advantage_estimator)["needs_sequence_logprobs"]
        )
