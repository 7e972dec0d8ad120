"""The drafter as the learner holds it during an RL run: trained online on the policy's own hidden states.

``OnlineDrafter`` owns the drafter, its trainer and its buffer. The learner feeds it the hidden states its
log-prob pass over each step's rollouts already computed (``add_step``), refreshes its copies of the shared
embedding and LM head whenever whole weights go to the engines (``set_shared_weights``: the drafter then matches
the target the engines serve), trains it within a time budget while the engines generate (``train``), and exports
its weights for the engines (``export``, the bytes ``Engine.load_drafter_weights`` takes). ``save``/``load`` keep
it (vLLM's EAGLE checkpoint format plus the trainer's state) in the run's checkpoints; the buffer is not saved:
after a resume it refills from the next steps.

With several learner ranks every rank holds an ``OnlineDrafter`` (``data_parallel=True``): each keeps the hidden
states of its own share of the rollouts, takes its share of every training batch (``batch_size`` sequences in
all), and the trainer sums the gradients across ranks, so the replicas stay identical and no hidden state leaves
the rank that computed it.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout.drafter.buffer import DrafterBuffer, DrafterSequence
from rollout.drafter.checkpoint import load_drafter, save_drafter, weights_for_reload, weights_for_transfer
from rollout.drafter.train import DrafterLossConfig, DrafterTrainer, DrafterTrainerConfig

TRAINER_STATE = "drafter_trainer.pt"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OnlineDrafterConfig:
    """The ``drafter`` config section's training part (``rl.config.DrafterSection`` documents each key)."""

    buffer_steps: int = 4
    buffer_tokens: int = 200_000
    buffer_dtype: str = "bfloat16"
    batch_size: int = 16
    lr: float = 3e-4
    feature_weight: float = 1.0
    token_weight: float = 0.1
    hidden_noise: float = 0.0
    grad_clip: float = 0.5
    seed: int = 0

    @classmethod
    def from_section(cls, section: dict) -> OnlineDrafterConfig:
        return cls(**{k: section[k] for k in cls.__dataclass_fields__ if k in section})


class OnlineDrafter:
    def __init__(self, drafter_dir: str | Path, config: OnlineDrafterConfig, device: torch.device,
                 export_dtype: torch.dtype = torch.float32, *, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.device = device
        self.export_dtype = export_dtype
        self.drafter = load_drafter(drafter_dir).to(device)
        self.drafter.set_shared_dtype(export_dtype)  # the target's dtype: its embedding and LM head as they are
        self.trainer = DrafterTrainer(self.drafter, DrafterTrainerConfig(
            lr=config.lr, batch_size=config.batch_size, grad_clip=config.grad_clip,
            loss=DrafterLossConfig(feature_weight=config.feature_weight, token_weight=config.token_weight,
                                   hidden_noise=config.hidden_noise)), seed=config.seed + rank,
            data_parallel=world_size > 1)
        # this rank's sequences per training batch: a near-equal share of batch_size
        self.batch_share = config.batch_size // world_size + (rank < config.batch_size % world_size)
        self.buffer = DrafterBuffer(config.buffer_steps, -(-config.buffer_tokens // world_size),  # this rank's share
                                    storage_dtype=STORAGE_DTYPES[config.buffer_dtype])
        self.shared_ready = False
        self.steps_added = 0

    # ---------------------------------------------------------------- data
    def set_shared_weights(self, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        self.drafter.set_shared_weights(embed.to(self.device), lm_head.to(self.device))
        self.shared_ready = True

    def add_step(self, sequences: list[DrafterSequence]) -> None:
        self.buffer.add_step(self.steps_added, sequences)
        self.steps_added += 1

    # ---------------------------------------------------------------- training
    def train(self, time_budget_s: float, max_steps: int | None = None) -> dict[str, float]:
        """Train on the buffer for at most ``time_budget_s`` seconds; ``drafter/train_start``/``train_end`` are
        wall-clock times (``time.time()``) for the caller's overlap accounting. Nothing happens (``drafter/steps``
        0) before the first step's data or the first shared weights arrive."""
        start = time.time()
        held = torch.tensor([self.buffer.num_tokens, self.buffer.num_sequences], dtype=torch.float64,
                            device=self.device)
        held = self.trainer.sum_over_ranks(held).tolist()  # every rank's buffer, when data-parallel
        out = {"drafter/buffer_tokens": held[0], "drafter/buffer_sequences": held[1]}
        # the same on every rank (the shared weights arrive in a collective export), so the ranks agree
        if held[1] == 0 or not self.shared_ready or time_budget_s <= 0:
            return {**out, "drafter/steps": 0.0, "drafter/train_s": 0.0,
                    "drafter/train_start": start, "drafter/train_end": start}

        def next_batch():
            if self.buffer.num_sequences == 0 or self.batch_share == 0:
                return None  # data-parallel only: this rank has no share of this batch
            return batch_to(self.buffer.sample_batch(self.batch_share, self.trainer.rng), self.device)

        metrics = self.trainer.train(next_batch, time_budget_s=time_budget_s, max_steps=max_steps)
        return {**out, **metrics, "drafter/train_start": start, "drafter/train_end": time.time()}

    # ---------------------------------------------------------------- weights
    def export(self) -> bytes:
        return weights_for_reload(self.drafter, dtype=self.export_dtype)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return weights_for_transfer(self.drafter, dtype=self.export_dtype)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_drafter(self.drafter, directory / "drafter", dtype=self.export_dtype)
        buf = io.BytesIO()
        torch.save(self.trainer.state_dict(), buf)
        (directory / TRAINER_STATE).write_bytes(buf.getvalue())

    def load(self, directory: str | Path) -> None:
        """The trainer state from ``save``'s directory (the drafter's own weights and optimizer; the shared
        weights stay as they are)."""
        path = Path(directory) / TRAINER_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the checkpoint has no drafter state (was it written with the drafter "
                                    "off?); set drafter.init_path to start a drafter from a checkpoint instead")
        self.trainer.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))


def batch_to(batch, device: torch.device):
    """``batch`` (a ``DrafterBatch``) on ``device``."""
    if device.type == "cpu":
        return batch
    from dataclasses import replace

    return replace(batch, input_ids=batch.input_ids.to(device), hidden_states=batch.hidden_states.to(device),
                   lengths=batch.lengths.to(device), loss_mask=batch.loss_mask.to(device),
                   target_logits=None if batch.target_logits is None else batch.target_logits.to(device))
