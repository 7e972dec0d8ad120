"""The learner: a transformers causal LM updated with a PPO-style policy loss.

``Learner`` is a plain class (the driver wraps it with ``ray.remote``). One optimizer step per mini-batch;
each mini-batch is cut into micro-batches by a token budget (``trainers.batching``), and the loss of every
micro-batch is normalized by the token/sequence count of the whole mini-batch, so gradient accumulation gives the
same gradient as one big batch. The algorithm math (advantages, policy loss, aggregation, KL) comes from
``rl.algorithms``; this module only moves tensors.

Around the update, each concern has its module: the token log-probs and the kernels that compute them
(``learner.kernels``, chosen once at start-up and logged: ``trainers.logprob``), the weight export to the engines
(``trainers.weight_export``), the online drafter (``trainers.drafter``) and the checkpoint format
(``trainers.checkpoint``). The learner is built from a :class:`trainers.settings.LearnerSettings` and the run's
``rl.algorithms.AlgorithmConfig``.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import torch

from rl.algorithms import (
    POLICY_LOSSES,
    AlgorithmConfig,
    PolicyLossInput,
    aggregate_loss,
    kl_estimate,
    kl_reward_penalty,
)
from rl.config import LoraSection
from rl.console import name_log
from rl.types import TrainSample
from trainers import checkpoint as C
from trainers import distributed as D
from trainers.batching import (
    MicroBatch,
    gather_response,
    make_micro_batches,
    move_micro_batch,
    padding_batch,
    response_mask,
    response_values,
)
from trainers.drafter import DrafterMixin
from trainers.logprob import KernelChoice, apply_kernels, select_kernels
from trainers.packing import use_packed_attention
from trainers.settings import LearnerSettings
from trainers.weight_export import WeightExportMixin


class Learner(WeightExportMixin, DrafterMixin):
    """Holds the policy (and optionally a frozen reference), the optimizer, and the update step.

    One rank of the learner group (``trainers.distributed``): with ``learner.strategy=fsdp2`` every public method
    that touches the model is a collective, so the driver calls it on all ranks with the same arguments and takes
    rank 0's answer (``trainers.sync.LearnerGroup``)."""

    STRATEGIES: tuple[str, ...] = ("single", "fsdp2")

    def __init__(
        self,
        model_path: str,
        settings: LearnerSettings,
        algo: AlgorithmConfig,
        *,
        temperature: float,
        seed: int = 0,
        dtype: str = "float32",
        export_dtype: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        master: tuple[str, int] | None = None,
    ) -> None:
        """``settings``: the ``learner`` section and what else the learner reads (``LearnerSettings.from_config``);
        ``algo``: the ``algorithm`` section. ``dtype``: the compute dtype (``model.dtype``); the parameters, gradients
        and AdamW state are held in ``settings.param_dtype`` (fp32 master weights by default); ``export_dtype``: the
        engines' dtype, which the weight export casts to on the device (None: ``dtype``)."""
        if not isinstance(settings, LearnerSettings) or not isinstance(algo, AlgorithmConfig):
            raise TypeError(f"Learner takes a trainers.settings.LearnerSettings and an rl.algorithms.AlgorithmConfig, "
                            f"got {type(settings).__name__} and {type(algo).__name__}")
        name_log(f"learner{rank}")  # <run>/logs/learner<rank>-<pid>.log when the run captures its workers' output
        from transformers import AutoModelForCausalLM

        self.cfg = settings
        self.algo = algo
        self.temperature = float(temperature)
        self.strategy = settings.strategy
        if self.strategy not in self.STRATEGIES:
            raise ValueError(f"learner.strategy={self.strategy!r}: {type(self).__name__} runs "
                             f"{' or '.join(self.STRATEGIES)} (trainers.learner.learner_class picks the class)")
        if self.strategy == "single" and world_size != 1:
            raise ValueError(f"learner.strategy=single runs one rank, got world_size={world_size}; use fsdp2")
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        torch.manual_seed(seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() and settings.num_gpus > 0 else "cpu")
        self.rank, self.world_size = rank, world_size
        if self.strategy != "single":
            D.init_process_group(rank, world_size, master or ("127.0.0.1", 29500), self.device,
                                 init_timeout_s=settings.init_timeout_s)
        # Sharded strategies load the whole model into host memory and move only their shard to the device.
        load_device = self.device if self.strategy == "single" else torch.device("cpu")
        self._set_dtypes(dtype, export_dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self._load_dtype()).to(load_device)
        self.drafter = None  # rollout.drafter.online.OnlineDrafter on every rank once drafter_setup ran
        self.model.train()
        if settings.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = None
        if self.algo.kl_coef > 0:  # KL to the initial policy, as a loss term or a reward penalty (algorithm.kl_in)
            # frozen, so no master copy: held in the compute dtype
            self.ref_model = copy.deepcopy(self.model).to(self.compute_dtype).eval().requires_grad_(False)
        self.lora_model = None  # the peft model (model.lora): self.model is its base, adapters injected in place
        if settings.lora is not None:
            self._apply_lora(settings.lora)
        self.policy_loss = POLICY_LOSSES.get(self.algo.policy_loss)
        self.kernels = KernelChoice()  # until checked below
        self._setup_policy()
        chosen = select_kernels(settings.kernels, self.model, self.device, settings.micro_batch_tokens,
                                compute_dtype=self.compute_dtype)
        # checked through the wrapped (possibly sharded) policy: a collective, every rank runs the same probe
        self.kernels = apply_kernels(self.model, chosen, self.device,
                                     logprobs_fn=lambda mb, choice: self.policy(mb, 1.0, False, choice)[0])
        if self.ref_model is not None and self.kernels.packed:
            use_packed_attention(self.ref_model, self.kernels.attention)
        if rank == 0:
            print(f"[learner] kernels: {self.kernels.describe()}; strategy={self.strategy} ranks={world_size}",
                  flush=True)
        self.num_updates = 0

    def _apply_lora(self, lora: LoraSection) -> None:
        """``model.lora``: freeze the base and inject peft adapters into ``self.model`` in place (after the
        reference copy, which stays the base policy), before any sharding, so every strategy shards the adapted
        model. The adapters start as rank 0's (their random A): every rank trains the same initial policy."""
        from trainers.lora import apply_lora

        self.lora_model = apply_lora(self.model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                     target_modules=lora.target_modules)
        self.model = self.lora_model.get_base_model()
        adapters = [p for p in self.model.parameters() if p.requires_grad]
        for p in adapters:  # the adapters are the trained weights: held in the strategy's master dtype
            p.data = p.data.to(self._adapter_dtype())
        D.broadcast_from_rank0([p.data for p in adapters])
        trainable = sum(p.numel() for p in adapters)
        total = sum(p.numel() for p in self.model.parameters())
        if self.rank == 0:
            print(f"[learner] LoRA rank {lora.rank} alpha {lora.alpha} on {list(lora.target_modules)}: "
                  f"{trainable} trainable of {total} parameters", flush=True)

    def _adapter_dtype(self) -> torch.dtype:
        """The dtype the adapters are held in: ``learner.param_dtype`` (the master weights)."""
        return self.param_dtype

    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameter count per parameter name (those the optimizer holds)."""
        return {n: p.numel() for n, p in self.model.named_parameters() if p.requires_grad}

    # ---------------------------------------------------------------- dtypes
    def _set_dtypes(self, dtype: str, export_dtype: str | None) -> None:
        """``param_dtype`` (parameters, gradients, AdamW state), ``compute_dtype`` (forward and backward) and
        ``export_dtype`` (the engines' weights)."""
        self.compute_dtype = D.DTYPES[dtype]
        self.param_dtype = D.DTYPES[self.cfg.param_dtype]
        self.export_dtype = D.DTYPES[export_dtype or dtype]
        if self.param_dtype != torch.float32 and self.param_dtype != self.compute_dtype:
            param, compute = (str(t).removeprefix("torch.") for t in (self.param_dtype, self.compute_dtype))
            raise ValueError(f"learner.param_dtype={param} with model.dtype={compute}: 16-bit parameters compute in "
                             f"their own dtype; set learner.param_dtype=float32 (master weights with {compute} "
                             f"compute) or model.dtype={param}")

    def _load_dtype(self) -> torch.dtype:
        """The dtype the model's parameters are held in (the master copy). With ``model.lora`` the base is frozen
        and needs no master copy: it is held in the compute dtype (the adapters in ``param_dtype``)."""
        return self.compute_dtype if self.cfg.lora is not None else self.param_dtype

    # ---------------------------------------------------------------- strategy hooks
    # The strategy-specific parts: how the policy is wrapped, backward, the optimizer step, the whole weights.
    # Everything else (micro-batches, losses, metrics, data split over ranks) is shared by every strategy.
    def _setup_policy(self) -> None:
        """``self.policy`` / ``self.ref_policy`` (callables: micro-batch -> log-probs) and ``self.optimizer``. With
        ``compute_dtype`` below ``param_dtype``: ``single`` runs its forward under autocast, FSDP2 gathers its
        parameters in the compute dtype (mixed precision); the parameters and AdamW state stay in ``param_dtype``."""
        mixed = self.compute_dtype if self.compute_dtype != self.param_dtype else None
        single = self.strategy == "single"
        self.policy = D.LogProbModule(self.model, autocast_dtype=mixed if single else None)
        # the reference is held in the compute dtype: nothing to cast
        self.ref_policy = D.LogProbModule(self.ref_model) if self.ref_model is not None else None
        if self.strategy == "fsdp2":
            D.shard_with_fsdp2(self.policy, self.cfg.fsdp, self.device, compute_dtype=mixed)
            if self.ref_policy is not None:
                D.shard_with_fsdp2(self.ref_policy, self.cfg.fsdp, self.device, trainable=False)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],  # with model.lora: the adapters alone
            lr=self.cfg.lr,
            betas=tuple(self.cfg.betas),
            weight_decay=self.cfg.weight_decay,
        )

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _optimizer_step(self) -> float:
        """Clip the global gradient norm to ``grad_clip``, step; the norm before clipping."""
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        grad_norm = D.full_tensor(torch.nn.utils.clip_grad_norm_(trainable, self.cfg.grad_clip))
        self.optimizer.step()
        return float(grad_norm)

    def _whole_tensors(self, select=None, dtype: torch.dtype | None = None, everywhere: frozenset[str] = frozenset(),
                       copy: bool = True, device: torch.device | str = "cpu"):
        """(HF name, whole tensor on ``device``) for the entries of the model's state dict that ``select`` (a
        name predicate; None: all) keeps, in state-dict order, cast to ``dtype`` (None: as held), on rank 0 (and
        on every rank for the names in ``everywhere``); (name, None) on the others. A collective when sharded:
        every rank iterates to the end with the same ``select``. The cast happens on the device, before the
        gather and the host copy. ``copy=False``: a tensor that needs neither cast nor move may be the live
        parameter itself."""
        for k, v in self.model.state_dict().items():
            if select is not None and not select(k):
                continue
            cast = v.detach().to(dtype) if dtype is not None else v.detach()
            full = D.full_tensor(cast)  # gathers one tensor at a time
            if self.rank != 0 and k not in everywhere:
                yield k, None
                continue
            out = full.to(device)
            if copy and out.dtype == v.dtype and v.device == out.device:  # neither the cast nor the move copied
                out = out.clone()
            yield k, out.contiguous()

    def _full_weights(self, everywhere: frozenset[str] = frozenset(), copy: bool = True,
                      device: torch.device | str = "cpu"):
        """Every entry of the model's state dict, whole, in ``export_dtype`` (``_whole_tensors``): what the weight
        export sends. The cast to the engines' dtype happens before the gather, so fp32 master weights cost no more
        bytes than the engines' weights. ``device``: where the whole tensors go (a GPU transport's sender packs
        them on the GPU: no round trip through host memory)."""
        return self._whole_tensors(dtype=self.export_dtype, everywhere=everywhere, copy=copy, device=device)

    # ---------------------------------------------------------------- log-probs
    @torch.no_grad()
    def compute_logprobs(self, samples: list[TrainSample], model=None, temperature: float | None = None,
                         capture: list | None = None) -> list[list[float]]:
        """Per-response-token log-probs under ``model`` (the policy by default, or ``self.ref_model``), same order
        as ``samples``. Each rank computes its share; every rank returns the whole list. ``capture``: a list that
        receives this rank's sequences with the policy's final hidden states (``DrafterSequence``, for the
        drafter, in ``drafter.buffer_dtype``, at most its share of ``drafter.buffer_tokens``), read off the same
        forward pass."""
        module = self.ref_policy if model is not None and model is self.ref_model else self.policy
        temp = self.temperature if temperature is None else temperature
        mine = D.assign_to_ranks([s.num_tokens for s in samples], self.world_size)[self.rank]
        local = [samples[i] for i in mine]
        mbs = make_micro_batches(local, self.cfg.micro_batch_tokens, packed=self.kernels.packed)
        rows: dict[int, list[float]] = {}
        hidden: list[torch.Tensor] = []
        hook = None
        if capture is not None:  # the decoder's output is the post-norm state the LM head reads (and vLLM's drafter)
            hook = self.model.get_decoder().register_forward_hook(
                lambda _m, _a, out: hidden.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
        try:
            for k in range(D.max_over_ranks(len(mbs))):
                if k >= len(mbs):  # padding pass: the other ranks' collectives need this rank's forward
                    module(self._to_device(padding_batch(self.kernels.packed)), temp, False, self.kernels)
                    continue
                mb = self._to_device(mbs[k])
                hidden.clear()
                logp, _ = module(mb, temp, False, self.kernels)
                for i, row in zip(mb.index, gather_response(mb, local, logp.float().cpu())):
                    rows[mine[i]] = row
                if capture is not None:
                    self._capture_sequences(capture, mb, local, hidden[-1])
        finally:
            if hook is not None:
                hook.remove()
        if self.world_size > 1:
            for part in D.gather_objects(rows):
                rows.update(part)
        return [rows[i] for i in range(len(samples))]

    def _to_device(self, mb: MicroBatch) -> MicroBatch:
        return mb if self.device.type == "cpu" else move_micro_batch(mb, self.device)

    def kl_reward_penalties(self, samples: list[TrainSample]) -> list[float]:
        """``kl_coef * sum_t KL_t`` per sample against the reference policy, for ``algorithm.kl_in=reward``.

        The KL estimate (``algorithm.kl_estimator``) is taken at the engine's behaviour log-probs of the sampled
        tokens (the policy that generated them) against the reference model's; tokens outside the loss mask are
        not counted.
        """
        if self.ref_model is None:
            raise ValueError("kl_reward_penalties needs algorithm.kl_coef > 0")
        ref = self.compute_logprobs(samples, model=self.ref_model)
        out = []
        for s, r in zip(samples, ref):
            n = len(s.response_token_ids)
            mask = torch.tensor(response_mask(s), dtype=torch.float64)
            logp = torch.tensor(s.behaviour_logprobs, dtype=torch.float64)
            pen = kl_reward_penalty(logp, torch.tensor(r, dtype=torch.float64), mask, torch.zeros(n, dtype=torch.long),
                                    1, self.algo.kl_coef, self.algo.kl_estimator)
            out.append(float(pen[0]))
        return out

    def probe_logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Temperature-1 log-probs of given responses (the canary's learner side)."""
        samples = [TrainSample(list(p), list(r), [0.0] * len(r), 0.0, "probe") for p, r in sequences]
        return self.compute_logprobs(samples, temperature=1.0)

    # ---------------------------------------------------------------- update
    def train_step(self, samples: list[TrainSample]) -> dict[str, float]:
        """One RL step's update. ``samples`` hold whole groups in order; mini-batches are consecutive slices.
        With a drafter, each rank keeps its share's hidden states from the old-log-prob pass for its replica."""
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        capture = [] if self.drafter is not None else None
        if self.cfg.old_logprob_source == "learner":
            old = self.compute_logprobs(samples, capture=capture)
        else:
            old = [s.behaviour_logprobs for s in samples]
        if capture is not None:  # each rank's drafter replica keeps the states of its own share
            self.drafter.add_step(capture)
        t_old = time.perf_counter() - t0
        kl_in_loss = self.ref_model is not None and self.algo.kl_in == "loss"
        ref = self.compute_logprobs(samples, model=self.ref_model) if kl_in_loss else None
        drift = [abs(a - b) for s, o in zip(samples, old) for a, b in zip(s.behaviour_logprobs, o)]

        # Consecutive near-equal slices that cover every sample (group sizes may vary: GDRO, dynamic sampling).
        n_mini = min(self.cfg.mini_batches_per_step, len(samples))
        bounds = np.linspace(0, len(samples), n_mini + 1).round().astype(int)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

        train_tokens = 0
        for _epoch in range(self.cfg.epochs_per_step):
            for m in range(n_mini):
                idx = list(range(bounds[m], bounds[m + 1]))
                stats = self._update(samples, idx, old, ref)
                train_tokens += stats.pop("tokens")
                for k, v in stats.items():
                    add(k, v)
        elapsed = time.perf_counter() - t0
        metrics = {k: sums[k] / counts[k] for k in sums}
        metrics.update(
            {
                "perf/learner_s": elapsed,
                "perf/learner_old_logprob_s": t_old,
                "perf/learner_tokens_per_s": train_tokens / max(elapsed, 1e-9),
                "rollout/logprob_abs_diff_mean": float(np.mean(drift)) if drift else 0.0,
                "rollout/logprob_abs_diff_max": float(np.max(drift)) if drift else 0.0,
                # this step's peak of the caching allocator on this rank (0 on CPU), before it is released below
                "perf/learner_max_reserved_gib": (torch.cuda.max_memory_reserved(self.device) / 2**30
                                                  if self.device.type == "cuda" else 0.0),
            }
        )
        self._release_cached_memory()
        return metrics

    def _release_cached_memory(self) -> None:
        """Give the caching allocator's free blocks back to the device (CUDA only), so that an engine sharing the
        GPU can use what the learner's peak held."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _update(self, samples, idx, old, ref) -> dict[str, float]:
        """One optimizer step on the mini-batch ``samples[idx]``. The loss is normalized by the whole mini-batch's
        counts; each rank runs its share of the samples and the gradient reduction sums over ranks."""
        n_tokens = float(sum(sum(response_mask(samples[i])) for i in idx))
        n_seqs = float(len(idx))
        mine = D.assign_to_ranks([samples[i].num_tokens for i in idx], self.world_size)[self.rank]
        sub = [samples[idx[j]] for j in mine]
        sub_old = [old[idx[j]] for j in mine]
        sub_ref = [ref[idx[j]] for j in mine] if ref is not None else None
        self._zero_grad()
        totals = {"loss/policy": 0.0, "loss/kl": 0.0, "loss/total": 0.0}
        weighted: dict[str, float] = {"loss/entropy": 0.0}
        mbs = make_micro_batches(sub, self.cfg.micro_batch_tokens, packed=self.kernels.packed)
        n_passes = D.max_over_ranks(len(mbs))
        for k in range(n_passes):
            if k >= len(mbs):  # padding pass with zero loss: keeps this rank in the other ranks' collectives
                logp, _ = self.policy(self._to_device(padding_batch(self.kernels.packed)), self.temperature, False,
                                      self.kernels)
                self._backward(logp.sum() * 0.0)
                continue
            mb = self._to_device(mbs[k])
            logp, entropy = self.policy(mb, self.temperature, True, self.kernels)
            mask = mb.resp_mask
            old_t = response_values(mb, sub, sub_old).to(logp.device)
            adv_t = mask * torch.tensor([sub[i].advantage for i in mb.index], device=logp.device)[mb.seq_ids]
            rows = mb.seq_ids
            sel = mask > 0
            inp = PolicyLossInput(
                logp=logp[sel], old_logp=old_t[sel], advantages=adv_t[sel], mask=mask[sel],
                seq_index=rows[sel], num_seqs=len(mb.index),
            )
            out = self.policy_loss(inp, self.algo)
            agg = dict(
                mode=self.algo.loss_agg_mode, global_num_tokens=n_tokens, global_num_seqs=n_seqs,
                const_len=self.algo.loss_agg_const_len,
            )
            per_token_loss = out.per_token_loss
            tis = None
            if self.cfg.tis_cap:  # async mode: truncated importance weight pi_old / pi_behaviour per token
                beh_t = response_values(mb, sub, [s.behaviour_logprobs for s in sub]).to(logp.device)
                ratio = torch.exp(old_t[sel] - beh_t[sel])
                tis = ratio.clamp(max=self.cfg.tis_cap)
                per_token_loss = per_token_loss * tis
            pg = aggregate_loss(per_token_loss, inp.mask, inp.seq_index, **agg)
            loss = pg
            if sub_ref is not None:
                ref_t = response_values(mb, sub, sub_ref).to(logp.device)
                kl = kl_estimate(logp[sel], ref_t[sel], self.algo.kl_estimator)
                kl_loss = aggregate_loss(kl, inp.mask, inp.seq_index, **agg)
                loss = loss + self.algo.kl_coef * kl_loss
                totals["loss/kl"] += float(kl_loss.detach())
            self._backward(loss)
            totals["loss/policy"] += float(pg.detach())
            totals["loss/total"] += float(loss.detach())
            share = float(mask.sum()) / max(n_tokens, 1.0)
            weighted["loss/entropy"] += share * float((entropy * mask).sum() / mask.sum().clamp(min=1))
            if tis is not None:
                for key, value in (("tis_weight_mean", tis.mean()), ("tis_clip_frac", (ratio > tis).float().mean())):
                    weighted[f"async/{key}"] = weighted.get(f"async/{key}", 0.0) + share * float(value)
            for key, value in out.metrics.items():  # every loss metric, token-share weighted over the mini-batch
                weighted[f"loss/{key}"] = weighted.get(f"loss/{key}", 0.0) + share * float(value)
        grad_norm = self._optimizer_step()
        self._zero_grad()  # free the gradients now, not at the next update: the engines need the memory meanwhile
        self.num_updates += 1
        if self.world_size > 1:  # every term is this rank's share of a mini-batch-normalized sum
            totals, weighted = D.sum_over_ranks({**totals, **weighted}), {}
        return {**totals, **weighted, "loss/grad_norm": float(grad_norm), "tokens": n_tokens}

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: str) -> None:
        """Model (safetensors, HF names), optimizer and RNG states into ``directory`` (the caller makes it atomic).
        The optimizer state is saved whole, keyed by parameter name, so a checkpoint resumes under any strategy
        and rank count. A collective under FSDP2; rank 0 writes. With ``model.lora``: ``adapter/`` (what trains,
        in the master dtype; what a resume loads), ``model/`` the merged weights (a complete ``model.path``), and
        the optimizer state of the adapter alone."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        if self.lora_model is not None:
            return self._save_lora(Path(directory))
        model_sd, optim_sd = get_state_dict(self.policy, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            path = Path(directory)
            path.mkdir(parents=True, exist_ok=True)
            weights = {k.removeprefix("lm."): v for k, v in model_sd.items()}
            self.model.save_pretrained(path / "model", state_dict=weights)
            C.write_learner_state(path, optim_sd, self.num_updates)
            if self.drafter is not None:
                self.drafter.save(path)
        D.barrier()

    def _save_lora(self, path: Path) -> None:
        """``adapter/``, ``model/`` (merged) and the adapter's AdamW state; a collective, rank 0 writes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        whole = dict(self._whole_tensors())  # held dtypes: the adapter's master weights, the base as loaded
        optim_sd = get_optimizer_state_dict(self.policy, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            self._write_lora_model(path, whole)
            C.write_learner_state(path, optim_sd, self.num_updates, lora=True)
        D.barrier()

    def _write_lora_model(self, path: Path, whole: dict[str, torch.Tensor]) -> None:
        """From the whole state dict (adapter tensors included): ``adapter/`` (what a resume loads, the adapter
        export) and ``model/`` (the merged weights with the model's config: a complete ``model.path``)."""
        from trainers.lora import adapter_files, is_adapter_key, merged_state_dict, write_adapter

        path.mkdir(parents=True, exist_ok=True)
        adapter = {k: v for k, v in whole.items() if is_adapter_key(k)}
        write_adapter(adapter_files(self.lora_model, tensors=adapter), path / "adapter")
        self.model.save_pretrained(path / "model", state_dict=merged_state_dict(self.lora_model, whole))

    def _read_adapter(self, path: Path) -> dict[str, torch.Tensor]:
        """A checkpoint's adapter, checked against ``model.lora``, under the base model's state-dict names."""
        from safetensors.torch import load_file

        from trainers.lora import adapter_keys

        file = path / "adapter" / "adapter_model.safetensors"
        if not file.is_file():
            raise RuntimeError(f"checkpoint {path} has no adapter ({file}): it was not written by a model.lora run; "
                               "resume it without model.lora, or start a LoRA run from its model/ (model.path)")
        tensors = load_file(str(file))
        keys = adapter_keys(self.lora_model)
        if set(tensors) != set(keys):
            missing, unexpected = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
            raise RuntimeError(f"checkpoint {path}: its adapter does not fit model.lora (missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]})")
        return {keys[name]: t for name, t in tensors.items()}

    def _check_checkpoint_kind(self, path: Path) -> None:
        """A LoRA checkpoint resumes only a LoRA run, and a full one only a full run."""
        if self.lora_model is None and (path / "adapter").is_dir():
            raise RuntimeError(f"checkpoint {path} was written by a model.lora run: resume it with the same "
                               "model.lora (its model/ holds the merged weights, which a new run can start from)")

    def _load_lora(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        adapter = self._read_adapter(path)
        # every rank holds the whole adapter; each keeps its shard (FSDP2) or all of it (single)
        set_model_state_dict(self.policy, {f"lm.{k}": v for k, v in adapter.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))
        state = C.read_learner_state(path)
        set_optimizer_state_dict(self.policy, self.optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.num_updates = state["num_updates"]
        C.set_rng_state(state["rng"])

    def load(self, directory: str) -> None:
        """Every rank reads the checkpoint (so ``directory`` must be on storage all learner nodes see)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = Path(directory)
        if self.lora_model is not None:
            return self._load_lora(path)
        self._check_checkpoint_kind(path)
        weights = C.read_model_weights(path, self.model)
        state = C.read_learner_state(path)
        if state.get("format") != "fqn":
            if self.strategy != "single":
                raise RuntimeError(f"checkpoint {path} has an optimizer state keyed by parameter order (an older "
                                   "format); resume it with learner.strategy=single")
            self.model.load_state_dict(weights, strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            set_state_dict(self.policy, self.optimizer,
                           model_state_dict={f"lm.{k}": v for k, v in weights.items()},
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.num_updates = state["num_updates"]
        C.set_rng_state(state["rng"])
        if self.drafter is not None:
            self.drafter.load(path)

    def ping(self) -> int:
        return os.getpid()


def learner_class(strategy: str) -> type[Learner]:
    """The learner class that runs ``learner.strategy``."""
    if strategy in Learner.STRATEGIES:
        return Learner
    if strategy == "deepspeed":
        from trainers.deepspeed_learner import DeepSpeedLearner  # imports DeepSpeed only when chosen

        return DeepSpeedLearner
    raise ValueError(f"learner.strategy={strategy!r} is not built; use one of "
                     f"{', '.join(Learner.STRATEGIES + ('deepspeed',))}")
