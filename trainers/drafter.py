"""The learner's side of the online speculative drafter (docs/drafter.md): every learner rank holds a replica
(``rollout.drafter.online.OnlineDrafter``), fills its buffer from the hidden states of its own share of the
old-log-prob pass, and trains it data-parallel; rank 0 exports it to the engines.
"""

from __future__ import annotations

import torch

from rl.types import TrainSample
from rl.weight_wire import BucketMeta, dtype_name
from rollout.drafter.online import OnlineDrafterConfig
from trainers.batching import MicroBatch, response_mask


def drafter_sequences(mb: MicroBatch, samples: list[TrainSample], hidden: torch.Tensor, dtype: torch.dtype,
                      budget: int) -> list:
    """One ``DrafterSequence`` per sequence of ``mb`` (``hidden``: the decoder's [R, L, H] output), on the CPU in
    ``dtype``, while their tokens fit in ``budget``; the loss mask marks the response tokens the policy produced
    (``loss_mask``), the positions a drafter drafts."""
    from rollout.drafter.buffer import DrafterSequence

    out = []
    for i, (row, col0) in zip(mb.index, mb.starts):
        s = samples[i]
        n, p = s.num_tokens, len(s.prompt_token_ids)
        if n > budget:
            break
        budget -= n
        mask = torch.zeros(n, dtype=torch.bool)
        mask[p:] = torch.tensor(response_mask(s), dtype=torch.bool)
        out.append(DrafterSequence(torch.tensor(s.prompt_token_ids + s.response_token_ids),
                                   hidden[row, col0:col0 + n].detach().to("cpu", dtype), mask))
    return out


class DrafterMixin:
    """The online drafter's methods of :class:`trainers.learner.Learner` (the driver's ``DrafterController`` calls
    them). It reads from the learner: ``model``, ``cfg``, ``device``, ``export_dtype``, ``rank``, ``world_size``,
    ``drafter`` (None until :meth:`drafter_setup`), ``_release_cached_memory`` and the weight export's ``_sender``."""

    def _shared_weight_names(self) -> tuple[str, str]:
        """State-dict names of the input embedding and the LM head weights (the same tensor when tied)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return (f"{names[id(self.model.get_input_embeddings())]}.weight",
                f"{names[id(self.model.get_output_embeddings())]}.weight")

    def drafter_setup(self, config: OnlineDrafterConfig, drafter_dir: str) -> int:
        """Hold a replica of the drafter saved in ``drafter_dir`` (``config``: the ``drafter`` section's training
        part, built on the driver) on every rank, trained data-parallel: each rank keeps the hidden states of its
        own share of each step's rollouts and the gradients are summed across ranks (``rollout.drafter.online``).
        Its copies of the shared weights arrive with the next weight export. Returns the drafter's trainable
        parameter count."""
        from rollout.drafter.model import num_trainable_parameters
        from rollout.drafter.online import OnlineDrafter

        if self.cfg.old_logprob_source != "learner":
            raise ValueError("the drafter learns from the learner's old-log-prob pass: set "
                             "learner.old_logprob_source=learner")
        if not isinstance(config, OnlineDrafterConfig):
            raise TypeError(f"drafter_setup takes an OnlineDrafterConfig, got {type(config).__name__}")
        self.drafter = OnlineDrafter(drafter_dir, config, self.device,
                                     export_dtype=self.export_dtype, rank=self.rank, world_size=self.world_size)
        return num_trainable_parameters(self.drafter.drafter)

    def _capture_sequences(self, capture: list, mb: MicroBatch, samples: list[TrainSample],
                           hidden: torch.Tensor) -> None:
        """Append ``mb``'s sequences with their hidden states [R, L, H] to ``capture``, within this rank's share of
        ``drafter.buffer_tokens`` (what ``capture`` already holds counts)."""
        buffer = self.drafter.buffer
        budget = buffer.max_tokens - sum(len(c) for c in capture)
        capture.extend(drafter_sequences(mb, samples, hidden, buffer.storage_dtype, budget))

    def drafter_train(self, time_budget_s: float, max_steps: int | None = None) -> dict[str, float]:
        """Train the drafter for at most ``time_budget_s`` (a collective: every rank calls it); the metrics are
        the same on every rank."""
        if self.drafter is None:
            return {}
        try:
            return self.drafter.train(time_budget_s, max_steps)
        finally:
            self._release_cached_memory()  # it trains while the engines generate beside it

    def drafter_transfer_meta(self) -> dict:
        """The drafter's own weights as one bucket's update info (``weight_bucket_meta``'s format) for the transfer
        group, taken now and sent by the next ``send_drafter`` (rank 0; the replicas are identical, so the other
        ranks take no part: an empty dict)."""
        if self.drafter is None or self.rank != 0:
            return {}
        named = list(self.drafter.export_tensors().items())
        meta = BucketMeta([n for n, _ in named], [dtype_name(t.dtype) for _, t in named],
                          [list(t.shape) for _, t in named])
        self._drafter_out = (meta, [t for _, t in named])
        return {**meta.as_dict(), "bucket": 0, "num_buckets": 1}

    def send_drafter(self) -> dict[str, float]:
        """Broadcast the weights ``drafter_transfer_meta`` took to the engine workers (rank 0)."""
        if self.drafter is None or self.rank != 0:
            return {}
        (meta, tensors), self._drafter_out = self._drafter_out, None
        try:
            return self._sender.send(meta, tensors)
        except Exception as e:  # noqa: BLE001 - the transport's error, named
            raise RuntimeError(f"weight transfer: sending the drafter failed: {str(e).splitlines()[0][:300]}") from None

    def export_drafter(self) -> bytes | None:
        """The drafter's weights for ``Engine.load_drafter_weights`` (rank 0; None elsewhere: the replicas are
        identical)."""
        return self.drafter.export() if self.drafter is not None and self.rank == 0 else None
