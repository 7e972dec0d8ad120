"""The EAGLE training objective and a time-budgeted drafter trainer.

For a sequence ``x[0..T-1]`` with the target's last hidden states ``h[0..T-1]`` (after the final norm), the drafter
at position ``t`` reads ``(x[t+1], h[t])`` and outputs ``f[t]``, its guess of ``h[t+1]`` (``t = 0..T-2``):

    feature loss  = SmoothL1(f[t], h[t+1])                               (mean over positions and hidden units)
    token loss    = -sum_v p[t+1](v) * log softmax(lm_head(f[t]))(v)      (mean over positions)
    loss          = feature_weight * feature loss + token_weight * token loss

``p[t+1]`` is the target's distribution over ``x[t+2]``: ``softmax(target_logits[t+1])``, which equals
``softmax(lm_head(h[t+1]))`` when the logits are not stored (``token_labels="soft"``), or one-hot on the sampled
``x[t+2]`` (``token_labels="sampled"``, for data where only the tokens are trusted). Positions count where
``t + 1`` is a real, loss-masked position (and ``t + 2`` is real for sampled labels). This is teacher forcing on
the target's features, as EAGLE trains; ``hidden_noise`` adds EAGLE's uniform input noise so that the drafter
tolerates its own, imperfect features when it drafts further than one token.

Top-1 agreement (``drafter/top1_agreement``) is the share of counted positions where ``argmax lm_head(f[t])``
equals the target's argmax: what a greedy verifier accepts for the first drafted token.

Data parallel: with ``DrafterTrainer(..., data_parallel=True)`` every rank of the default process group holds a
replica and trains on its own share of each batch (its own buffer). The means above are taken over the counted
positions of the whole batch (the ranks' counts are summed first: ``loss_counts``), each rank's loss is its share
of that mean, and the gradients are summed across ranks in one all-reduce, so a step equals the one-rank step on
the union of the shares and the replicas stay identical.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rollout.drafter.buffer import DrafterBatch, DrafterBuffer
from rollout.drafter.model import Drafter

TOKEN_LABELS = ("soft", "sampled")


@dataclass(frozen=True)
class DrafterLossConfig:
    feature_weight: float = 1.0
    """Weight of the smooth-L1 feature regression (EAGLE: 1.0)."""
    token_weight: float = 0.1
    """Weight of the token cross-entropy (EAGLE: 0.1)."""
    token_labels: Literal["soft", "sampled"] = "soft"
    """``soft``: the target's distribution; ``sampled``: the next token of the sequence."""
    smooth_l1_beta: float = 1.0
    """Where smooth L1 turns from quadratic to linear."""
    hidden_noise: float = 0.0
    """Half-width of uniform noise added to the input hidden states in training (EAGLE: 0.1 on its data scale)."""
    chunk_bytes: int = 128 << 20
    """The token loss runs over chunks of positions whose fp32 ``[chunk, vocab]`` logits take about this many bytes
    (its gradient is formed chunk by chunk in the forward); 0: all positions at once. At a 152k vocabulary, 128 MiB
    is 220 positions."""

    def __post_init__(self) -> None:
        if self.token_labels not in TOKEN_LABELS:
            raise ValueError(f"unknown token_labels {self.token_labels!r}: valid are {list(TOKEN_LABELS)}")
        if self.feature_weight < 0 or self.token_weight < 0 or self.feature_weight + self.token_weight == 0:
            raise ValueError("feature_weight and token_weight must be >= 0 and not both 0")


def _counted(batch: DrafterBatch, cfg: DrafterLossConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mask of counted positions ``t`` ([B, T-1]) and, for sampled labels, which of them have a next token
    (over the counted positions)."""
    b, t = batch.input_ids.shape
    if t < 2:
        raise ValueError("drafter training needs sequences of at least 2 tokens")
    pos = torch.arange(t - 1)
    counted = (pos[None] + 1 < batch.lengths.cpu()[:, None]) & batch.loss_mask.cpu()[:, 1:]
    if cfg.token_labels == "soft":
        return counted, None
    return counted, (pos[None] + 2 < batch.lengths.cpu()[:, None])[counted]


def loss_counts(batch: DrafterBatch | None, cfg: DrafterLossConfig) -> tuple[int, int]:
    """(counted positions, positions in the token loss) of ``batch`` (0, 0 for None): the denominators of the
    means, summed across ranks when training data-parallel."""
    return (0, 0) if batch is None else _counts(*_counted(batch, cfg))


def _counts(counted: torch.Tensor, has_next: torch.Tensor | None) -> tuple[int, int]:
    n = int(counted.sum())
    return n, (n if has_next is None else int(has_next.sum()))


class _ChunkedTokenLoss(torch.autograd.Function):
    """The token loss summed over positions, and the number of positions whose drafted top-1 is the target's, in
    chunks of positions. The gradient with respect to the drafter's features is formed in the forward, chunk by
    chunk, from ``d loss / d logits = softmax(logits) - target distribution`` (one-hot for sampled labels), so no
    ``[positions, vocab]`` tensor outlives its chunk and nothing is recomputed in the backward. The LM head is
    frozen (shared with the target): it gets no gradient."""

    @staticmethod
    def forward(ctx, f, weight, target, stored, labels, has_next, chunk: int, need_grad: bool):
        grad = torch.zeros_like(f) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=f.device)
        hits = torch.zeros((), dtype=torch.long, device=f.device)
        for lo in range(0, f.shape[0], chunk):
            part = slice(lo, lo + chunk)
            logits = (f[part].to(weight.dtype) @ weight.T).float()  # [c, V]
            logp = torch.log_softmax(logits, dim=-1)
            target_logits = (stored[part].float() if stored is not None
                             else (target[part].to(weight.dtype) @ weight.T).float())
            hits += (logits.argmax(-1) == target_logits.argmax(-1)).sum()
            if labels is None:  # soft: the target's distribution
                q = torch.softmax(target_logits, dim=-1)
                total -= (q * logp).sum()
                dlogits = logp.exp_().sub_(q) if need_grad else None
            else:  # sampled: the next token, where there is one
                keep, y = has_next[part], labels[part]
                total -= logp[keep].gather(1, y[keep, None]).sum()
                if need_grad:
                    dlogits = logp.exp_()
                    dlogits[~keep] = 0
                    rows = keep.nonzero().squeeze(1)
                    dlogits[rows, y[rows]] -= 1
            if need_grad:
                grad[part] = (dlogits.to(weight.dtype) @ weight).to(f.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(hits)
        return total, hits

    @staticmethod
    def backward(ctx, grad_total, _grad_hits):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None, None, None


def drafter_loss(
    drafter: Drafter,
    batch: DrafterBatch,
    cfg: DrafterLossConfig,
    *,
    generator: torch.Generator | None = None,
    totals: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective above on one batch: (loss with grad, ``drafter/*`` metrics).

    ``totals``: the denominators (``loss_counts`` of the whole, data-parallel batch); the loss and the metrics
    are then this batch's shares of the whole batch's means, which add up across ranks. Default: this batch's
    own counts (plain means)."""
    ids, hidden = batch.input_ids, batch.hidden_states.float()
    b, t = ids.shape
    counted, has_next = _counted(batch, cfg)
    n_pos, n_tok = totals if totals is not None else _counts(counted, has_next)
    counted = counted.to(ids.device)
    if n_pos == 0:
        raise ValueError("no position in the batch counts for the loss (all masked or too short)")
    if has_next is not None and n_tok == 0:
        raise ValueError("sampled token labels need sequences with at least 3 tokens")

    inputs = hidden[:, :-1]
    if cfg.hidden_noise > 0 and drafter.training:
        noise = torch.rand(inputs.shape, generator=generator, dtype=inputs.dtype)
        inputs = inputs + (2 * noise.to(inputs.device) - 1) * cfg.hidden_noise
    pred = drafter(ids[:, 1:], inputs)  # [B, T-1, H]: guesses of h[t+1]

    f, target = pred[counted], hidden[:, 1:][counted]  # [N, H]
    feature_loss = F.smooth_l1_loss(f, target, beta=cfg.smooth_l1_beta, reduction="sum") / max(n_pos * f.shape[-1], 1)
    stored = batch.target_logits[:, 1:][counted] if batch.target_logits is not None else None
    labels = None
    if has_next is not None:
        labels = torch.cat([ids[:, 2:], ids.new_zeros(b, 1)], dim=1)[counted]
        has_next = has_next.to(ids.device)
    n, vocab = f.shape[0], drafter.cfg.vocab_size
    chunk = max(1, cfg.chunk_bytes // (4 * vocab)) if cfg.chunk_bytes > 0 else max(n, 1)
    token_sum, hits = _ChunkedTokenLoss.apply(f, drafter.lm_head.weight, target.detach(), stored, labels, has_next,
                                              chunk, torch.is_grad_enabled() and f.requires_grad)
    hits = int(hits)
    token_loss = token_sum / max(n_tok, 1)
    loss = cfg.feature_weight * feature_loss + cfg.token_weight * token_loss
    metrics = {
        "drafter/loss": loss.item(),
        "drafter/feature_loss": feature_loss.item(),
        "drafter/token_loss": token_loss.item(),
        "drafter/top1_agreement": hits / max(n_pos, 1),
        "drafter/positions": float(counted.sum().item()),
    }
    return loss, metrics


@dataclass(frozen=True)
class DrafterTrainerConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    """Max global gradient norm (<= 0: no clipping)."""
    batch_size: int = 16
    """Sequences per training step when sampling from a buffer."""
    loss: DrafterLossConfig = field(default_factory=DrafterLossConfig)


class DrafterTrainer:
    """AdamW on the drafter's own weights (never the shared embedding or LM head).

    ``data_parallel``: every rank of the default ``torch.distributed`` group runs this trainer on its own replica
    and its own share of the data (see the module docstring); the ranks must call ``step``/``train`` together."""

    def __init__(self, drafter: Drafter, config: DrafterTrainerConfig = DrafterTrainerConfig(), *, seed: int = 0,
                 data_parallel: bool = False):
        self.drafter = drafter
        self.config = config
        params = drafter.trainable_parameters()
        assert all(p.requires_grad for p in params)
        assert not (drafter.embed_tokens.weight.requires_grad or drafter.lm_head.weight.requires_grad)
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.num_steps = 0
        self.data_parallel = data_parallel and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed in place across the ranks when data-parallel (as it is otherwise)."""
        if self.data_parallel:
            dist.all_reduce(t)
        return t

    def step(self, batch: DrafterBatch | None, totals: tuple[int, int] | None = None) -> dict[str, float]:
        """One optimizer step on ``batch``; returns its ``drafter/*`` metrics (before the update; of the whole
        batch when data-parallel). Data-parallel: ``batch`` is this rank's share (None: no share this step) and
        ``totals`` the whole batch's ``loss_counts`` (summed here when not given)."""
        device = next(self.drafter.parameters()).device
        if self.data_parallel and totals is None:
            totals = tuple(int(x) for x in self.sum_over_ranks(
                torch.tensor(loss_counts(batch, self.config.loss), dtype=torch.float64, device=device)).tolist())
        self.drafter.train()
        self.optimizer.zero_grad(set_to_none=True)
        params = self.drafter.trainable_parameters()
        names = ("drafter/loss", "drafter/feature_loss", "drafter/token_loss", "drafter/top1_agreement",
                 "drafter/positions")
        if batch is not None:
            loss, metrics = drafter_loss(self.drafter, batch, self.config.loss, generator=self.generator,
                                         totals=totals if self.data_parallel else None)
            loss.backward()
        else:
            metrics = dict.fromkeys(names, 0.0)
        if self.data_parallel:  # the gradients of the shares, and the metrics' shares, summed in one all-reduce
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1).float() for g in grads]
                             + [torch.tensor([metrics[k] for k in names], device=device)])
            self.sum_over_ranks(flat)
            offset = 0
            for p in params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            metrics = dict(zip(names, flat[offset:].tolist()))
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            metrics["drafter/grad_norm"] = float(norm)
        self.optimizer.step()
        self.num_steps += 1
        return metrics

    @torch.no_grad()
    def evaluate(self, batch: DrafterBatch) -> dict[str, float]:
        """The loss metrics on ``batch`` without an update (no input noise)."""
        self.drafter.eval()
        return drafter_loss(self.drafter, batch, self.config.loss)[1]

    def train(
        self,
        next_batch: Callable[[], DrafterBatch | None],
        *,
        time_budget_s: float,
        max_steps: int | None = None,
    ) -> dict[str, float]:
        """Steps on ``next_batch()`` until ``time_budget_s`` is spent (a step started before the deadline finishes)
        or ``max_steps`` are done.

        Data-parallel, ``next_batch()`` gives this rank's share (None: none), the ranks stop together (when one
        rank's budget is spent, or when no rank has data), and the metrics are the whole batches'.

        Returns the mean of the steps' metrics, ``drafter/loss_last`` (the last step's loss), ``drafter/steps``,
        ``drafter/train_s`` and ``drafter/tokens`` (tokens in the batches, all ranks').
        """
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        steps = tokens = 0
        last = float("nan")
        device = next(self.drafter.parameters()).device
        while max_steps is None or steps < max_steps:
            over = time.perf_counter() - t0 >= time_budget_s
            batch = None if over else next_batch()
            if not self.data_parallel:
                if over:
                    break
                totals = None
            else:  # one small all-reduce: the shares' counts and whether any rank is out of time
                n_pos, n_tok = loss_counts(batch, self.config.loss)
                agreed = self.sum_over_ranks(torch.tensor(
                    [n_pos, n_tok, float(over), batch.num_tokens if batch is not None else 0],
                    dtype=torch.float64, device=device)).tolist()
                if agreed[2] > 0 or agreed[0] == 0:
                    break
                totals = (int(agreed[0]), int(agreed[1]))
            metrics = self.step(batch, totals)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            tokens += int(agreed[3]) if self.data_parallel else batch.num_tokens
            last = metrics["drafter/loss"]
        out = {k: v / steps for k, v in sums.items()}
        out.update({"drafter/loss_last": last, "drafter/steps": float(steps),
                    "drafter/train_s": time.perf_counter() - t0, "drafter/tokens": float(tokens)})
        return out

    def train_on_buffer(self, buffer: DrafterBuffer, *, time_budget_s: float,
                        max_steps: int | None = None) -> dict[str, float]:
        """``train`` on batches of ``config.batch_size`` sequences sampled from ``buffer``."""
        return self.train(lambda: buffer.sample_batch(self.config.batch_size, self.rng),
                          time_budget_s=time_budget_s, max_steps=max_steps)

    def state_dict(self) -> dict:
        """Drafter weights (own only), optimizer state and step count, for ``torch.save`` (the tensors are the live
        ones, not copies)."""
        return {"drafter": self.drafter.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        result = self.drafter.load_state_dict(state["drafter"], strict=False)
        assert not result.unexpected_keys and all(k.startswith(Drafter.SHARED_PREFIXES) for k in result.missing_keys)
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_steps = int(state["num_steps"])
