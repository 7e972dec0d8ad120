"""The learner: a transformers causal LM updated with a PPO-style policy loss.

``Learner`` is a plain class (the driver wraps it with ``ray.remote``). One optimizer step per mini-batch;
each mini-batch is cut into micro-batches by a token budget, and the loss of every micro-batch is
normalized by the token/sequence count of the whole mini-batch, so gradient accumulation gives the same
gradient as one big batch. The algorithm math (advantages, policy loss, aggregation, KL) comes from
``rl.algorithms``; this module only moves tensors.

Kernels (``learner.kernels``, chosen once at start-up by :func:`select_kernels` and logged): micro-batches are
right-padded rows or packed rows (``trainers.packing``), and token log-probs come from the model's full logits
(``naive``) or from its final hidden states and LM-head weight without the [tokens, vocab] logits
(``chunked`` / ``triton``, ``trainers.fused_logprob``).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rl.algorithms import (
    POLICY_LOSSES,
    AlgorithmConfig,
    PolicyLossInput,
    aggregate_loss,
    kl_estimate,
    kl_reward_penalty,
)
from rl.config import KernelsConfig
from rl.console import name_log
from rl.types import TrainSample
from rl.weight_wire import BucketMeta, dtype_name
from trainers import distributed as D
from trainers.fused_logprob import (
    IGNORE_INDEX,
    LOGPROB_KERNELS,
    logprob_kernel_unavailable,
)
from trainers.packing import (
    pack_groups,
    packed_forward_kwargs,
    packed_positions,
    packing_unsupported,
    select_attention_backend,
    use_packed_attention,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MicroBatch:
    """B sequences, right-padded (R = B rows) or packed back to back (R = 1 row). Position t of a row predicts
    token t+1 of that row.

    input_ids:    [R, L]   prompt+response ids (padded with 0).
    attn_mask:    [R, L]   1 on real tokens (padded); None when packed.
    position_ids: [R, L]   restarting at 0 for each sequence (packed); None when padded.
    cu_seqlens:   [B+1]    int32 sequence offsets in the row (packed); None when padded.
    max_seqlen:   longest sequence (packed; 0 when padded).
    resp_mask:    [R, L-1] loss mask: 1 where position t predicts a trained response token.
    resp_pos:     [R, L-1] bool: True where position t predicts any response token (log-probs are needed there).
    seq_ids:      [R, L-1] long: the sequence (0..B-1 in this micro-batch) position t belongs to.
    targets:      [R, L-1] next-token ids.
    index:        which samples of the caller's list are in this micro-batch, in order.
    starts:       (row, column) of each sequence's first token, in ``index`` order.
    """

    input_ids: torch.Tensor
    attn_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    resp_mask: torch.Tensor
    resp_pos: torch.Tensor
    seq_ids: torch.Tensor
    targets: torch.Tensor
    index: list[int]
    starts: list[tuple[int, int]]

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


def make_micro_batches(samples: list[TrainSample], token_budget: int, packed: bool = False) -> list[MicroBatch]:
    """Samples grouped into micro-batches of at most ``token_budget`` tokens (a longer single sample gets a
    micro-batch of its own). Padded: greedy in length order, padded tokens count. Packed: first-fit decreasing
    on real tokens (``trainers.packing.pack_groups``)."""
    if packed:
        groups = pack_groups([s.num_tokens for s in samples], token_budget)
        return [_collate_packed([samples[i] for i in g], g) for g in groups]
    order = sorted(range(len(samples)), key=lambda i: samples[i].num_tokens)
    groups: list[list[int]] = []
    for i in order:
        if groups:
            cur = groups[-1]
            longest = max(samples[j].num_tokens for j in cur + [i])
            if longest * (len(cur) + 1) <= token_budget:
                cur.append(i)
                continue
        groups.append([i])
    return [_collate([samples[i] for i in g], g) for g in groups]


def _mark_response(resp: torch.Tensor, resp_pos: torch.Tensor, row: int, col0: int, s: TrainSample) -> None:
    p, r = len(s.prompt_token_ids), len(s.response_token_ids)
    mask = s.loss_mask if s.loss_mask is not None else [1] * r
    # position t predicts token t+1: response token j sits at col0+p+j and is predicted at col0+p+j-1.
    resp[row, col0 + p - 1 : col0 + p - 1 + r] = torch.tensor(mask, dtype=torch.float32)
    resp_pos[row, col0 + p - 1 : col0 + p - 1 + r] = True


def _collate(samples: list[TrainSample], index: list[int]) -> MicroBatch:
    length = max(s.num_tokens for s in samples)
    b = len(samples)
    ids = torch.zeros(b, length, dtype=torch.long)
    attn = torch.zeros(b, length, dtype=torch.long)
    resp = torch.zeros(b, length - 1, dtype=torch.float32)
    resp_pos = torch.zeros(b, length - 1, dtype=torch.bool)
    for row, s in enumerate(samples):
        seq = s.prompt_token_ids + s.response_token_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        _mark_response(resp, resp_pos, row, 0, s)
    seq_ids = torch.arange(b).unsqueeze(1).expand(b, length - 1).clone()
    return MicroBatch(ids, attn, None, None, 0, resp, resp_pos, seq_ids, ids[:, 1:].clone(), index,
                      [(row, 0) for row in range(b)])


def _collate_packed(samples: list[TrainSample], index: list[int]) -> MicroBatch:
    lengths = [s.num_tokens for s in samples]
    position_ids, cu = packed_positions(lengths)
    ids = torch.tensor([t for s in samples for t in s.prompt_token_ids + s.response_token_ids]).unsqueeze(0)
    width = ids.shape[1] - 1
    resp = torch.zeros(1, width, dtype=torch.float32)
    resp_pos = torch.zeros(1, width, dtype=torch.bool)
    seq_ids = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths))[:width].unsqueeze(0)
    starts = []
    for k, s in enumerate(samples):
        col0 = int(cu[k])
        _mark_response(resp, resp_pos, 0, col0, s)
        starts.append((0, col0))
    return MicroBatch(ids, None, position_ids, cu, max(lengths), resp, resp_pos, seq_ids, ids[:, 1:].clone(), index,
                      starts)


def _response_values(mb: MicroBatch, samples: list[TrainSample], values: list[list[float]]) -> torch.Tensor:
    """Scatter per-response-token values into the [R, L-1] layout of ``mb``."""
    out = torch.zeros_like(mb.resp_mask)
    for (row, col0), i in zip(mb.starts, mb.index):
        p, r = len(samples[i].prompt_token_ids), len(samples[i].response_token_ids)
        if r:
            out[row, col0 + p - 1 : col0 + p - 1 + r] = torch.tensor(values[i], dtype=torch.float32)
    return out


def _gather_response(mb: MicroBatch, samples: list[TrainSample], tensor: torch.Tensor) -> list[list[float]]:
    rows = []
    for (row, col0), i in zip(mb.starts, mb.index):
        p, r = len(samples[i].prompt_token_ids), len(samples[i].response_token_ids)
        rows.append(tensor[row, col0 + p - 1 : col0 + p - 1 + r].tolist())
    return rows


@dataclass(frozen=True)
class KernelChoice:
    """What the learner runs: a ``LOGPROB_KERNELS`` name, ``padded`` or a packed attention backend
    (``trainers.packing.ATTENTION_BACKENDS``), the chunked kernel's rows per chunk, and why auto/fallbacks chose so."""

    logprob: str = "naive"
    attention: str = "padded"
    chunk_size: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def packed(self) -> bool:
        return self.attention != "padded"

    def describe(self) -> str:
        why = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"logprob={self.logprob} attention={self.attention}{why}"


def _forward_kwargs(mb: MicroBatch) -> dict:
    if mb.packed:
        return dict(input_ids=mb.input_ids, **packed_forward_kwargs(mb.position_ids, mb.cu_seqlens, mb.max_seqlen))
    return dict(input_ids=mb.input_ids, attention_mask=mb.attn_mask)


def token_logprobs(model, mb: MicroBatch, temperature: float, with_entropy: bool = False,
                   kernels: KernelChoice | None = None):
    """Log-probs [R, L-1] of the next tokens after temperature (as vLLM's processed log-probs), and optionally
    entropies [R, L-1] (detached: a metric). Kernels whose capability ``full_logits`` is set run the model's own
    head (all of [R, L, V] in memory); the others get the final hidden states and the LM-head weight and compute
    only the response positions (``mb.resp_pos``; zeros elsewhere)."""
    kernels = kernels or KernelChoice()
    fwd = _forward_kwargs(mb)
    if LOGPROB_KERNELS.capabilities(kernels.logprob)["full_logits"]:
        logits = model(**fwd).logits[:, :-1].float()
        logp_all = F.log_softmax(logits / temperature, dim=-1)
        logp = logp_all.gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)
        if not with_entropy:
            return logp, None
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy
    hidden = model.get_decoder()(**fwd).last_hidden_state[:, :-1]  # [R, L-1, H]
    sel = mb.resp_pos
    weight = model.get_output_embeddings().weight  # [V, H]; the embedding itself when tied
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # mixed precision: the kernel's GEMMs in the compute dtype too
        compute = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(compute), weight.to(compute)
    lp, ent = LOGPROB_KERNELS.get(kernels.logprob)(hidden[sel], weight, mb.targets[sel], temperature,
                                                   IGNORE_INDEX, kernels.chunk_size)
    logp = lp.new_zeros(sel.shape).index_put((sel,), lp)
    if not with_entropy:
        return logp, None
    return logp, ent.detach().new_zeros(sel.shape).index_put((sel,), ent.detach())


_AUTO_LOGITS_BYTES = 256 << 20  # CPU auto: fused log-probs once a micro-batch's fp32 logits would exceed this


def _whole_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape (a DeepSpeed ZeRO-3 partitioned parameter holds an empty tensor and keeps its
    shape in ``ds_shape``; an FSDP2 DTensor reports its global shape)."""
    return getattr(param, "ds_shape", param.shape)


def fused_head_unsupported(model) -> str | None:
    """Why the fused kernels cannot reproduce ``model``'s logits from hidden states @ LM-head weight (None if
    they can)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or len(_whole_shape(head.weight)) != 2:
        return "the model has no linear output embedding"
    if getattr(head, "bias", None) is not None:
        return "the LM head has a bias"
    cfg = model.config
    for key in ("final_logit_softcapping", "logit_softcapping"):
        if getattr(cfg, key, None):
            return f"the model soft-caps its logits ({key}={getattr(cfg, key)})"
    for key in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({key}={getattr(cfg, key)})"
    if model.get_decoder() is model:
        return "the model exposes no separate decoder for hidden states"
    return None


def select_kernels(cfg: KernelsConfig, model, device: torch.device, micro_batch_tokens: int,
                   compute_dtype: torch.dtype | None = None) -> KernelChoice:
    """Resolve ``learner.kernels`` for this model and device. An explicit choice that cannot run here is an error;
    a model the fused head or packing cannot reproduce falls back (naive / padded) with the reason in ``notes``.
    ``compute_dtype``: the dtype the forward runs in (None: the parameters'; fp32 master weights computing in bf16
    under autocast or FSDP2 mixed precision get the half-precision attention kernels)."""
    notes: list[str] = []
    logprob = cfg.logprob
    if logprob == "auto":
        if device.type == "cuda":
            why = logprob_kernel_unavailable("triton", device)
            logprob = "chunked" if why else "triton"
            if why:
                notes.append(f"auto logprob: {why}, so chunked")
        else:
            logits_bytes = micro_batch_tokens * _whole_shape(model.get_output_embeddings().weight)[0] * 4
            logprob = "chunked" if logits_bytes > _AUTO_LOGITS_BYTES else "naive"
            notes.append(f"auto logprob on CPU: {logits_bytes / 2**20:.0f} MiB of fp32 logits per micro-batch")
    else:
        why = logprob_kernel_unavailable(logprob, device)
        if why:
            raise ValueError(f"learner.kernels.logprob={logprob!r} cannot run here: {why}. "
                             f"Use auto or one of {', '.join(n for n in LOGPROB_KERNELS.names() if n != logprob)}")
    if not LOGPROB_KERNELS.capabilities(logprob)["full_logits"]:
        why = fused_head_unsupported(model)
        if why:
            notes.append(f"logprob {logprob} -> naive: {why}")
            logprob = "naive"
    attention = cfg.attention
    if attention == "auto":
        attention = "packed" if device.type == "cuda" else "padded"
    if attention == "packed":
        why = packing_unsupported(model)
        if why:
            notes.append(f"attention packed -> padded: {why}")
            attention = "padded"
        else:
            attention, skipped = select_attention_backend(device, compute_dtype or next(model.parameters()).dtype)
            if device.type == "cuda":  # on CPU only the per-sequence path exists; nothing to explain
                notes.extend(skipped)
    return KernelChoice(logprob, attention, cfg.logprob_chunk_size, tuple(notes))


def _mb_to(mb: MicroBatch, device: torch.device) -> MicroBatch:
    moved = {f.name: getattr(mb, f.name).to(device) for f in dataclasses.fields(mb)
             if isinstance(getattr(mb, f.name), torch.Tensor)}
    return dataclasses.replace(mb, **moved)


def apply_kernels(model, kernels: KernelChoice, device: torch.device, logprobs_fn=None,
                  chunked_fallback: bool | None = None) -> KernelChoice:
    """Set ``model`` up for ``kernels`` (packed attention) and check it on a two-sequence probe against padded +
    naive (the model's own attention and head). ``logprobs_fn(mb, choice) -> logp`` runs the probe (default:
    ``token_logprobs`` on ``model``; a sharded learner passes its wrapped policy, and then every rank must call
    this: which probes run depends only on ``kernels`` and ``chunked_fallback``, never on their results).

    On a mismatch the model's own attention is restored where packed attention is dropped, and the reasons go to
    ``notes``. What replaces a failed choice:

    - ``chunked_fallback`` (default: on CUDA): the log-prob kernel (with padded attention) and the packed attention
      (with the model's own head) are probed separately as well, and what passes is kept. A failed fused
      log-prob kernel falls back to ``chunked`` when chunked passes its own probe (naive holds the whole
      [tokens, V] logits: tens of GB at 16K tokens x 152K vocabulary), to naive only when chunked fails too (a
      head that transforms its logits undeclared); failed packed attention falls back to padded.
    - otherwise (CPU, where the fused choices are chunked and the per-sequence attention): padded + naive.

    Tolerance: ``floor + 2 eps L``. ``L`` is the largest |logit| the model's head returned on the probe, ``eps``
    the machine epsilon of the dtype it returned them in. The reference's logits are rounded to that dtype, a
    fused kernel's are not (Triton, fp32 accumulation) or are rounded from another GEMM (chunked): per logit they
    differ by at most one ulp, eps * |z| <= eps L, and a log-prob z_y - logsumexp(z) by at most twice that. A
    fixed absolute tolerance fails spuriously on bf16 logits above ~32 (ulp 0.25). ``floor`` (1e-3 for fp32
    logits, 0.1 below) covers the rest, mainly another attention kernel's rounding in the hidden states. The
    failures this check is for (an undeclared logit scale or soft-cap, a wrong attention mask) move log-probs by
    several nats."""
    if kernels == KernelChoice(notes=kernels.notes):
        return kernels
    if chunked_fallback is None:
        chunked_fallback = device.type == "cuda"
    g = torch.Generator().manual_seed(1234)  # a local generator: the global RNG stream is left untouched
    vocab = min(model.config.vocab_size, _whole_shape(model.get_input_embeddings().weight)[0])
    probe = [TrainSample(torch.randint(0, vocab, (n,), generator=g).tolist(),
                         torch.randint(0, vocab, (m,), generator=g).tolist(), [0.0] * m, 0.0, "probe")
             for n, m in ((3, 5), (4, 2))]

    def run(choice: KernelChoice) -> list[float]:
        mb = _mb_to(make_micro_batches(probe, 1 << 20, packed=choice.packed)[0], device)
        with torch.no_grad():
            logp = (logprobs_fn(mb, choice) if logprobs_fn is not None
                    else token_logprobs(model, mb, 1.0, kernels=choice)[0])
        by_sample = dict(zip(mb.index, _gather_response(mb, probe, logp.float().cpu())))
        return [x for i in range(len(probe)) for x in by_sample[i]]

    head_out: dict = {}

    def record(_module, _inputs, out):
        if isinstance(out, torch.Tensor) and out.numel() > 0:
            head_out["max"] = max(head_out.get("max", 0.0), float(out.detach().abs().amax()))
            head_out["dtype"] = out.dtype

    was_training, own_attention = model.training, model.config._attn_implementation
    model.eval()
    hook = model.get_output_embeddings().register_forward_hook(record)
    try:
        want = run(KernelChoice())
    finally:
        hook.remove()
    chunk = kernels.chunk_size
    # fused log-prob kernels to try, in order of preference (naive, the model's own head, is the last resort)
    fused = [] if LOGPROB_KERNELS.capabilities(kernels.logprob)["full_logits"] else [kernels.logprob]
    if chunked_fallback and fused and fused[0] != "chunked":
        fused.append("chunked")
    if chunked_fallback:  # every part alone with padded attention, then with the packed attention
        probes = [KernelChoice(name, "padded", chunk) for name in fused]
        packed_probes = ([KernelChoice("naive", kernels.attention)]
                         + [KernelChoice(name, kernels.attention, chunk) for name in fused]) if kernels.packed else []
    else:  # the choice as a whole
        probes, packed_probes = ([], [kernels]) if kernels.packed else ([kernels], [])
    got = {(c.logprob, c.attention): run(c) for c in probes}
    if kernels.packed:
        use_packed_attention(model, kernels.attention)
        got.update({(c.logprob, c.attention): run(c) for c in packed_probes})
    model.train(was_training)
    out_dtype = head_out.get("dtype", next(model.parameters()).dtype)
    floor = 1e-3 if torch.finfo(out_dtype).bits >= 32 else 0.1
    tol = floor + 2 * torch.finfo(out_dtype).eps * head_out.get("max", 0.0)
    err = {key: max(abs(a - b) for a, b in zip(values, want)) for key, values in got.items()}

    def passes(logprob: str, attention: str) -> bool:
        return err[(logprob, attention)] <= tol

    notes = list(kernels.notes)

    def fail(logprob: str, attention: str, what: str) -> None:
        notes.append(f"self-check: logprob={logprob} attention={attention} differs from padded+naive by "
                     f"{err[(logprob, attention)]:.2e} > {tol:.2e}{what}")

    if not chunked_fallback:
        key = (kernels.logprob, kernels.attention)
        if passes(*key):
            return kernels
        if kernels.packed:
            model.set_attn_implementation(own_attention)
        fail(*key, ", so padded+naive")
        return KernelChoice(notes=tuple(notes))
    logprob = "naive"
    for name in fused:
        if passes(name, "padded"):
            logprob = name
            break
        fail(name, "padded", "")
    attention = kernels.attention
    if kernels.packed:  # the attention with the model's own head, then with the log-prob kernel kept
        for name in dict.fromkeys(["naive", logprob]):
            if not passes(name, attention):
                fail(name, attention, "")
                attention = "padded"
                model.set_attn_implementation(own_attention)
                break
    if (logprob, attention) == (kernels.logprob, kernels.attention):
        return kernels
    notes.append(f"so logprob={logprob} attention={attention}")
    return KernelChoice(logprob, attention, chunk, tuple(notes))


_LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+)\.")


def plan_weight_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Names in order, cut into buckets of about ``bucket_bytes`` (0: everything in one). A decoder layer
    (``...layers.N.*``) is never split: an inference engine fuses a layer's projections (q/k/v, gate/up) into one
    tensor that must be loaded whole; a layer larger than the bound gets a bucket of its own. Other entries
    (embedding, final norm, LM head) are units of one tensor."""
    if bucket_bytes < 0:
        raise ValueError(f"bucket_bytes must be >= 0, got {bucket_bytes}")

    def unit(entry: tuple[str, int]) -> str:
        m = _LAYER_PREFIX.match(entry[0])
        return m.group(1) if m else entry[0]

    buckets: list[list[str]] = [[]]
    filled = 0
    for _, group in itertools.groupby(sizes, key=unit):
        entries = list(group)
        size = sum(s for _, s in entries)
        if bucket_bytes and filled and filled + size > bucket_bytes:
            buckets.append([])
            filled = 0
        buckets[-1].extend(n for n, _ in entries)
        filled += size
    return buckets


class Learner:
    """Holds the policy (and optionally a frozen reference), the optimizer, and the update step.

    One rank of the learner group (``trainers.distributed``): with ``learner.strategy=fsdp2`` every public method
    that touches the model is a collective, so the driver calls it on all ranks with the same arguments and takes
    rank 0's answer (``trainers.sync.LearnerGroup``)."""

    STRATEGIES: tuple[str, ...] = ("single", "fsdp2")

    def __init__(
        self,
        model_path: str,
        learner_cfg: dict,
        algo_cfg: dict,
        *,
        temperature: float,
        seed: int = 0,
        dtype: str = "float32",
        export_dtype: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        master: tuple[str, int] | None = None,
    ) -> None:
        """``dtype``: the compute dtype (``model.dtype``); the parameters, gradients and AdamW state are held in
        ``learner_cfg["param_dtype"]`` (``learner.param_dtype``: float32 by default in the config, fp32 master
        weights; a dict without the key keeps them in ``dtype``, with no master copy); ``export_dtype``: the engines'
        dtype, which the weight export casts to on the device (None: ``dtype``)."""
        name_log(f"learner{rank}")  # <run>/logs/learner<rank>-<pid>.log when the run captures its workers' output
        from transformers import AutoModelForCausalLM

        self.cfg = learner_cfg
        self.algo = AlgorithmConfig.model_validate(algo_cfg)
        self.temperature = float(temperature)
        self.strategy = learner_cfg.get("strategy", "single")
        if self.strategy not in self.STRATEGIES:
            raise ValueError(f"learner.strategy={self.strategy!r}: {type(self).__name__} runs "
                             f"{' or '.join(self.STRATEGIES)} (trainers.learner.learner_class picks the class)")
        if self.strategy == "single" and world_size != 1:
            raise ValueError(f"learner.strategy=single runs one rank, got world_size={world_size}; use fsdp2")
        if learner_cfg.get("torch_threads"):
            torch.set_num_threads(int(learner_cfg["torch_threads"]))
        torch.manual_seed(seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() and learner_cfg.get("num_gpus", 0) > 0 else "cpu")
        self.rank, self.world_size = rank, world_size
        if self.strategy != "single":
            D.init_process_group(rank, world_size, master or ("127.0.0.1", 29500), self.device,
                                 init_timeout_s=float(learner_cfg.get("init_timeout_s", 300.0)))
        # Sharded strategies load the whole model into host memory and move only their shard to the device.
        load_device = self.device if self.strategy == "single" else torch.device("cpu")
        self._set_dtypes(dtype, export_dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self._load_dtype()).to(load_device)
        self.drafter = None  # rollout.drafter.online.OnlineDrafter on every rank once drafter_setup ran
        self.model.train()
        if learner_cfg.get("activation_checkpointing"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = None
        if self.algo.kl_coef > 0:  # KL to the initial policy, as a loss term or a reward penalty (algorithm.kl_in)
            # frozen, so no master copy: held in the compute dtype
            self.ref_model = copy.deepcopy(self.model).to(self.compute_dtype).eval().requires_grad_(False)
        self.lora_model = None  # the peft model (model.lora): self.model is its base, adapters injected in place
        if learner_cfg.get("lora"):
            self._apply_lora(learner_cfg["lora"])
        self.policy_loss = POLICY_LOSSES.get(self.algo.policy_loss)
        self.kernels = KernelChoice()  # until checked below
        self._setup_policy()
        kernel_cfg = KernelsConfig.model_validate(learner_cfg.get("kernels") or {})
        chosen = select_kernels(kernel_cfg, self.model, self.device, learner_cfg["micro_batch_tokens"],
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

    def _apply_lora(self, lora: dict) -> None:
        """``model.lora``: freeze the base and inject peft adapters into ``self.model`` in place (after the
        reference copy, which stays the base policy). Only ``learner.strategy=single`` is wired."""
        from trainers.lora import apply_lora

        if self.strategy != "single":
            raise ValueError(f"model.lora with learner.strategy={self.strategy}: LoRA is wired for strategy=single only")
        self.lora_model = apply_lora(self.model, rank=int(lora["rank"]), alpha=float(lora["alpha"]),
                                     dropout=float(lora.get("dropout", 0.0)), target_modules=lora["target_modules"])
        self.model = self.lora_model.get_base_model()
        for p in self.model.parameters():  # the adapters are the master weights: learner.param_dtype
            if p.requires_grad:
                p.data = p.data.to(self.param_dtype)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        print(f"[learner] LoRA rank {lora['rank']} alpha {lora['alpha']} on {list(lora['target_modules'])}: "
              f"{trainable} trainable of {total} parameters", flush=True)

    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameter count per parameter name (those the optimizer holds)."""
        return {n: p.numel() for n, p in self.model.named_parameters() if p.requires_grad}

    # ---------------------------------------------------------------- dtypes
    def _set_dtypes(self, dtype: str, export_dtype: str | None) -> None:
        """``param_dtype`` (parameters, gradients, AdamW state), ``compute_dtype`` (forward and backward) and
        ``export_dtype`` (the engines' weights)."""
        fsdp_cfg = self.cfg.get("fsdp") or {}
        # a learner_cfg dict written before learner.param_dtype existed: fsdp.param_dtype was FSDP2's compute dtype
        legacy = fsdp_cfg.get("param_dtype") if self.strategy == "fsdp2" else None
        self.compute_dtype = _DTYPES[legacy or dtype]
        self.param_dtype = _DTYPES[self.cfg.get("param_dtype") or dtype]
        self.export_dtype = _DTYPES[export_dtype or dtype]
        if self.param_dtype != torch.float32 and self.param_dtype != self.compute_dtype:
            param, compute = (str(t).removeprefix("torch.") for t in (self.param_dtype, self.compute_dtype))
            raise ValueError(f"learner.param_dtype={param} with model.dtype={compute}: 16-bit parameters compute in "
                             f"their own dtype; set learner.param_dtype=float32 (master weights with {compute} "
                             f"compute) or model.dtype={param}")

    def _load_dtype(self) -> torch.dtype:
        """The dtype the model's parameters are held in (the master copy). With ``model.lora`` the base is frozen
        and needs no master copy: it is held in the compute dtype (the adapters in ``param_dtype``)."""
        return self.compute_dtype if self.cfg.get("lora") else self.param_dtype

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
            fsdp_cfg = self.cfg.get("fsdp") or {}
            D.shard_with_fsdp2(self.policy, fsdp_cfg, self.device, compute_dtype=mixed)
            if self.ref_policy is not None:
                D.shard_with_fsdp2(self.ref_policy, fsdp_cfg, self.device, trainable=False)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],  # with model.lora: the adapters alone
            lr=self.cfg["lr"],
            betas=tuple(self.cfg["betas"]),
            weight_decay=self.cfg["weight_decay"],
        )

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _optimizer_step(self) -> float:
        """Clip the global gradient norm to ``grad_clip``, step; the norm before clipping."""
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        grad_norm = D.full_tensor(torch.nn.utils.clip_grad_norm_(trainable, self.cfg["grad_clip"]))
        self.optimizer.step()
        return float(grad_norm)

    def _full_weights(self, everywhere: frozenset[str] = frozenset(), copy: bool = True,
                      device: torch.device | str = "cpu"):
        """(HF name, whole tensor on the CPU in ``export_dtype``) for every entry of the model's state dict, on rank
        0 (and on every rank for the names in ``everywhere``); (name, None) on the others. A collective when
        sharded: every rank iterates to the end. The cast to the engines' dtype happens on the device, before the
        gather and the host copy, so fp32 master weights cost no more bytes than the engines' weights.
        ``copy=False``: a tensor that needs neither cast nor move may be the live parameter itself (for a caller
        that copies it anyway, such as the transport's packing). ``device``: where the whole tensors go (a GPU
        transport's sender packs them on the GPU: no round trip through host memory)."""
        for k, v in self.model.state_dict().items():
            cast = v.detach().to(self.export_dtype)
            full = D.full_tensor(cast)  # gathers one tensor at a time
            if self.rank != 0 and k not in everywhere:
                yield k, None
                continue
            out = full.to(device)
            if copy and out.dtype == v.dtype and v.device == out.device:  # neither the cast nor the move copied
                out = out.clone()
            yield k, out.contiguous()

    def _weight_shapes(self) -> list[tuple[str, list[int]]]:
        """(HF name, whole shape) for every state-dict entry, in the order ``_full_weights`` yields them (a sharded
        DTensor reports its global shape); read from metadata, nothing gathered."""
        return [(k, list(v.shape)) for k, v in self.model.state_dict().items()]

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
        mbs = make_micro_batches(local, self.cfg["micro_batch_tokens"], packed=self.kernels.packed)
        rows: dict[int, list[float]] = {}
        hidden: list[torch.Tensor] = []
        hook = None
        if capture is not None:  # the decoder's output is the post-norm state the LM head reads (and vLLM's drafter)
            hook = self.model.get_decoder().register_forward_hook(
                lambda _m, _a, out: hidden.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
        try:
            for k in range(D.max_over_ranks(len(mbs))):
                if k >= len(mbs):  # padding pass: the other ranks' collectives need this rank's forward
                    module(self._to_device(self._padding_batch()), temp, False, self.kernels)
                    continue
                mb = self._to_device(mbs[k])
                hidden.clear()
                logp, _ = module(mb, temp, False, self.kernels)
                for i, row in zip(mb.index, _gather_response(mb, local, logp.float().cpu())):
                    rows[mine[i]] = row
                if capture is not None:
                    buffer = self.drafter.buffer  # this rank's share of drafter.buffer_tokens
                    budget = buffer.max_tokens - sum(len(c) for c in capture)
                    capture.extend(_drafter_sequences(mb, local, hidden[-1], buffer.storage_dtype, budget))
        finally:
            if hook is not None:
                hook.remove()
        if self.world_size > 1:
            for part in D.gather_objects(rows):
                rows.update(part)
        return [rows[i] for i in range(len(samples))]

    def _padding_batch(self) -> MicroBatch:
        return make_micro_batches([TrainSample([0], [0], [0.0], 0.0, "padding")], 1 << 20,
                                  packed=self.kernels.packed)[0]

    def _to_device(self, mb: MicroBatch) -> MicroBatch:
        return mb if self.device.type == "cpu" else _mb_to(mb, self.device)

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
            mask = torch.tensor(s.loss_mask if s.loss_mask is not None else [1] * n, dtype=torch.float64)
            logp = torch.tensor(s.behaviour_logprobs, dtype=torch.float64)
            pen = kl_reward_penalty(logp, torch.tensor(r, dtype=torch.float64), mask, torch.zeros(n, dtype=torch.long),
                                    1, self.algo.kl_coef, self.algo.kl_estimator)
            out.append(float(pen[0]))
        return out

    # ---------------------------------------------------------------- update
    def train_step(self, samples: list[TrainSample]) -> dict[str, float]:
        """One RL step's update. ``samples`` hold whole groups in order; mini-batches are consecutive slices.
        With a drafter, each rank keeps its share's hidden states from the old-log-prob pass for its replica."""
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        capture = [] if self.drafter is not None else None
        if self.cfg["old_logprob_source"] == "learner":
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
        n_mini = min(self.cfg["mini_batches_per_step"], len(samples))
        bounds = np.linspace(0, len(samples), n_mini + 1).round().astype(int)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

        train_tokens = 0
        for _epoch in range(self.cfg["epochs_per_step"]):
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
        masks = [samples[i].loss_mask if samples[i].loss_mask is not None else [1] * len(samples[i].response_token_ids)
                 for i in idx]
        n_tokens = float(sum(sum(m) for m in masks))
        n_seqs = float(len(idx))
        mine = D.assign_to_ranks([samples[i].num_tokens for i in idx], self.world_size)[self.rank]
        sub = [samples[idx[j]] for j in mine]
        sub_old = [old[idx[j]] for j in mine]
        sub_ref = [ref[idx[j]] for j in mine] if ref is not None else None
        self._zero_grad()
        totals = {"loss/policy": 0.0, "loss/kl": 0.0, "loss/total": 0.0}
        weighted: dict[str, float] = {"loss/entropy": 0.0}
        mbs = make_micro_batches(sub, self.cfg["micro_batch_tokens"], packed=self.kernels.packed)
        n_passes = D.max_over_ranks(len(mbs))
        for k in range(n_passes):
            if k >= len(mbs):  # padding pass with zero loss: keeps this rank in the other ranks' collectives
                logp, _ = self.policy(self._to_device(self._padding_batch()), self.temperature, False, self.kernels)
                self._backward(logp.sum() * 0.0)
                continue
            mb = self._to_device(mbs[k])
            logp, entropy = self.policy(mb, self.temperature, True, self.kernels)
            mask = mb.resp_mask
            old_t = _response_values(mb, sub, sub_old).to(logp.device)
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
            if self.cfg.get("tis_cap"):  # async mode: truncated importance weight pi_old / pi_behaviour per token
                beh_t = _response_values(mb, sub, [s.behaviour_logprobs for s in sub]).to(logp.device)
                ratio = torch.exp(old_t[sel] - beh_t[sel])
                tis = ratio.clamp(max=float(self.cfg["tis_cap"]))
                per_token_loss = per_token_loss * tis
            pg = aggregate_loss(per_token_loss, inp.mask, inp.seq_index, **agg)
            loss = pg
            if sub_ref is not None:
                ref_t = _response_values(mb, sub, sub_ref).to(logp.device)
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

    # ---------------------------------------------------------------- weights and checkpoints
    def _weight_sizes(self) -> list[tuple[str, int]]:
        """(HF name, whole tensor's bytes) for every state-dict entry, in the order ``_full_weights`` yields them;
        read from metadata, nothing gathered."""
        size = torch.empty(0, dtype=self.export_dtype).element_size()
        return [(k, v.numel() * size) for k, v in self.model.state_dict().items()]

    def begin_weight_export(self, bucket_bytes: int = 0, copy: bool = True) -> int:
        """Start an export of the whole weights in buckets of about ``bucket_bytes`` (0: one bucket), cut only
        between decoder layers (``plan_weight_buckets``); returns the number of buckets. Every rank then calls
        ``next_weight_bucket`` (or ``send_weight_bucket``) for each bucket in order (the gathers are collectives).
        ``copy=False``: the bucket's tensors may be the live parameters (``send_weight_bucket`` packs them into its
        send buffer, which is the copy)."""
        self._export_plan = plan_weight_buckets(self._weight_sizes(), bucket_bytes)
        # every rank's drafter replica reads the shared embedding and LM head (and keeps them: copies)
        sender_device = getattr(getattr(self, "_sender", None), "device", None)
        self._export_iter = self._full_weights(
            frozenset(self._shared_weight_names()) if self.drafter is not None else frozenset(),
            copy=copy or self.drafter is not None,
            device=sender_device if not copy and sender_device is not None and self.drafter is None else "cpu")
        self._export_shared: dict[str, torch.Tensor] = {}
        return len(self._export_plan)

    def weight_bucket_meta(self) -> list[dict]:
        """What each bucket of the started export holds (``rl.weight_wire.BucketMeta`` fields plus ``bucket`` and
        ``num_buckets``): the update info of vLLM's weight-transfer API, one per bucket, for the engines."""
        n = len(self._export_plan)
        return [{**self._bucket_meta(b).as_dict(), "bucket": b, "num_buckets": n} for b in range(n)]

    def _bucket_meta(self, index: int) -> BucketMeta:
        """Names, dtype (``export_dtype``: ``_full_weights`` casts every entry to it) and whole shapes of a bucket."""
        shapes = dict(self._weight_shapes())
        names = list(self._export_plan[index])
        return BucketMeta(names, [dtype_name(self.export_dtype)] * len(names), [shapes[x] for x in names])

    def weight_transport_address(self) -> tuple[str, int]:
        """This node's address and a free port for the transfer group's rendezvous (asked of rank 0, which hosts
        it)."""
        return D.free_address()

    def init_weight_transport(self, address: str | None, port: int | None, world_size: int, timeout_s: float,
                              transport: str = "gloo") -> float:
        """Rank 0 opens its sender for the resolved ``sync.transport`` (``trainers.weight_transport.make_sender``:
        for ``gloo`` / ``nccl`` it waits for the engine workers to join the transfer group); the other ranks only
        take part in the gathers. Returns seconds."""
        if self.rank != 0:
            return 0.0
        from trainers.weight_transport import make_sender

        t0 = time.perf_counter()
        if getattr(self, "_sender", None) is not None:
            self._sender.close()
        self._sender = make_sender(transport, address, port, world_size, timeout_s, self.device)
        return time.perf_counter() - t0

    def send_weight_bucket(self, index: int) -> dict[str, float]:
        """Gather bucket ``index`` of the started export (every rank) and broadcast it to the engine workers (rank
        0); returns rank 0's bytes and seconds (gather, pack, send), nothing on the others."""
        t0 = time.perf_counter()
        bucket = self._next_bucket(index)
        if self.rank != 0:
            return {}
        gather_s = time.perf_counter() - t0
        meta = self._bucket_meta(index)  # what the engines were told; packing checks every tensor against it
        try:
            info = self._sender.send(meta, [bucket[x] for x in meta.names])
        except Exception as e:  # noqa: BLE001 - the transport's error, with the bucket's position
            raise RuntimeError(f"weight transfer: sending bucket {index + 1}/{len(self._export_plan)} failed: "
                               f"{str(e).splitlines()[0][:300]}") from None
        return {**info, "gather_s": gather_s}

    def release_weight_buffers(self) -> None:
        """After a sync over ``ipc``: the shared buffers of its last buckets are released (the engines have loaded
        them)."""
        if self.rank == 0 and getattr(self, "_sender", None) is not None:
            self._sender.close()

    def next_weight_bucket(self, index: int) -> bytes | None:
        """Bucket ``index`` of the export ``begin_weight_export`` started: safetensors bytes of its whole tensors
        (HF names; tied tensors cloned so safetensors accepts them) on rank 0, None on the others. Sharded
        parameters are gathered one tensor at a time, so no rank holds more than its shard plus one bucket."""
        from safetensors.torch import save as st_save

        bucket = self._next_bucket(index)
        if self.rank != 0:
            return None
        return st_save(bucket)

    def _next_bucket(self, index: int) -> dict[str, torch.Tensor | None]:
        """Bucket ``index``'s whole tensors by name (None on ranks other than 0), gathered in the plan's order."""
        names = self._export_plan[index]
        bucket = {}
        for want in names:
            name, tensor = next(self._export_iter)
            if name != want:
                raise RuntimeError(f"weight export out of order: got {name!r}, planned {want!r}")
            bucket[name] = tensor
        if self.drafter is not None:  # the drafter trains against the target the engines serve (on every rank)
            shared = self._shared_weight_names()
            self._export_shared.update({n: bucket[n] for n in shared if n in bucket})
            if index == len(self._export_plan) - 1:
                self.drafter.set_shared_weights(*(self._export_shared[n] for n in shared))
                self._export_shared = {}
        if index == len(self._export_plan) - 1:
            self._release_cached_memory()  # the gathers' blocks go back to the device (the engines wake next)
        return bucket

    def export_weights(self) -> bytes | None:
        """The whole weights in one piece: ``next_weight_bucket`` of a one-bucket export."""
        self.begin_weight_export(0)
        return self.next_weight_bucket(0)

    # ---------------------------------------------------------------- the speculative drafter (data-parallel)
    def _shared_weight_names(self) -> tuple[str, str]:
        """State-dict names of the input embedding and the LM head weights (the same tensor when tied)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return (f"{names[id(self.model.get_input_embeddings())]}.weight",
                f"{names[id(self.model.get_output_embeddings())]}.weight")

    def drafter_setup(self, section: dict, drafter_dir: str) -> int:
        """Hold a replica of the drafter saved in ``drafter_dir`` (``section``: the ``drafter`` config) on every
        rank, trained data-parallel: each rank keeps the hidden states of its own share of each step's rollouts
        and the gradients are summed across ranks (``rollout.drafter.online``). Its copies of the shared weights
        arrive with the next weight export. Returns the drafter's trainable parameter count."""
        from rollout.drafter.model import num_trainable_parameters
        from rollout.drafter.online import OnlineDrafter, OnlineDrafterConfig

        if self.cfg["old_logprob_source"] != "learner":
            raise ValueError("the drafter learns from the learner's old-log-prob pass: set "
                             "learner.old_logprob_source=learner")
        self.drafter = OnlineDrafter(drafter_dir, OnlineDrafterConfig.from_section(section), self.device, export_dtype=self.export_dtype, rank=self.rank,
                                     world_size=self.world_size)
        return num_trainable_parameters(self.drafter.drafter)

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
        self._drafter_out = self.drafter.export_tensors()
        named = list(self._drafter_out.items())
        meta = BucketMeta([n for n, _ in named], [dtype_name(t.dtype) for _, t in named], [list(t.shape) for _, t in named])
        return {**meta.as_dict(), "bucket": 0, "num_buckets": 1}

    def send_drafter(self) -> dict[str, float]:
        """Broadcast the weights ``drafter_transfer_meta`` took to the engine workers (rank 0)."""
        if self.drafter is None or self.rank != 0:
            return {}
        named, self._drafter_out = list(self._drafter_out.items()), None
        meta = BucketMeta([n for n, _ in named], [dtype_name(t.dtype) for _, t in named], [list(t.shape) for _, t in named])
        try:
            return self._sender.send(meta, [t for _, t in named])
        except Exception as e:  # noqa: BLE001 - the transport's error, named
            raise RuntimeError(f"weight transfer: sending the drafter failed: {str(e).splitlines()[0][:300]}") from None

    def export_drafter(self) -> bytes | None:
        """The drafter's weights for ``Engine.load_drafter_weights`` (rank 0; None elsewhere: the replicas are
        identical)."""
        return self.drafter.export() if self.drafter is not None and self.rank == 0 else None

    def probe_logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Temperature-1 log-probs of given responses (the canary's learner side)."""
        samples = [TrainSample(list(p), list(r), [0.0] * len(r), 0.0, "probe") for p, r in sequences]
        return self.compute_logprobs(samples, temperature=1.0)

    def export_adapter(self) -> dict[str, bytes] | None:
        """``model.lora``: the adapter's files (``trainers.lora.adapter_files``) in the engines' dtype, what each
        sync sends; rank 0 (None elsewhere, and without LoRA)."""
        from trainers.lora import adapter_files

        if self.lora_model is None or self.rank != 0:
            return None
        return adapter_files(self.lora_model, dtype=self.export_dtype)

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
            state = {
                "format": "fqn",
                "optimizer": optim_sd,
                "num_updates": self.num_updates,
                "rng": _rng_state(),
            }
            buf = io.BytesIO()
            torch.save(state, buf)
            (path / "learner_state.pt").write_bytes(buf.getvalue())
            if self.drafter is not None:
                self.drafter.save(path)
        D.barrier()

    def _learner_state(self, optim_sd: dict) -> bytes:
        buf = io.BytesIO()
        torch.save({"format": "fqn", "optimizer": optim_sd, "num_updates": self.num_updates, "rng": _rng_state(),
                    "lora": self.lora_model is not None}, buf)
        return buf.getvalue()

    def _save_lora(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from trainers.lora import adapter_files, merged_state_dict, write_adapter

        optim_sd = get_optimizer_state_dict(self.policy, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path.mkdir(parents=True, exist_ok=True)
        write_adapter(adapter_files(self.lora_model), path / "adapter")
        self.model.save_pretrained(path / "model", state_dict=merged_state_dict(self.lora_model))
        (path / "learner_state.pt").write_bytes(self._learner_state(optim_sd))

    def _load_lora(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        file = path / "adapter" / "adapter_model.safetensors"
        if not file.is_file():
            raise RuntimeError(f"checkpoint {path} has no adapter ({file}): it was not written by a model.lora run; "
                               "resume it without model.lora, or start a LoRA run from its model/ (model.path)")
        tensors = load_file(str(file))
        want = set(adapter_state_dict_names(self.lora_model))
        if set(tensors) != want:
            raise RuntimeError(f"checkpoint {path}: its adapter does not fit model.lora (missing "
                               f"{sorted(want - set(tensors))[:4]}, unexpected {sorted(set(tensors) - want)[:4]})")
        set_peft_model_state_dict(self.lora_model, tensors)
        state = torch.load(path / "learner_state.pt", weights_only=False)
        set_optimizer_state_dict(self.policy, self.optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.num_updates = state["num_updates"]
        _set_rng_state(state["rng"])

    def load(self, directory: str) -> None:
        """Every rank reads the checkpoint (so ``directory`` must be on storage all learner nodes see)."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = Path(directory)
        if self.lora_model is not None:
            return self._load_lora(path)
        if (path / "adapter").is_dir():
            raise RuntimeError(f"checkpoint {path} was written by a model.lora run: resume it with the same "
                               "model.lora (its model/ holds the merged weights, which a new run can start from)")
        weights = load_file(str(path / "model" / "model.safetensors"))
        expected = set(self.model.state_dict())
        if self.model.config.tie_word_embeddings and "lm_head.weight" in expected and "lm_head.weight" not in weights:
            emb = self.model.get_input_embeddings().weight
            name = next(k for k, v in self.model.state_dict(keep_vars=True).items()
                        if v is emb and k != "lm_head.weight")
            weights["lm_head.weight"] = weights[name]
        # Tied LM heads are saved once; anything else missing is a real mismatch.
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path}: missing {missing}, unexpected {unexpected}")
        state = torch.load(path / "learner_state.pt", weights_only=False)
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
        _set_rng_state(state["rng"])
        if self.drafter is not None:
            self.drafter.load(path)

    def ping(self) -> int:
        return os.getpid()


def _drafter_sequences(mb: MicroBatch, samples: list[TrainSample], hidden: torch.Tensor, dtype: torch.dtype,
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
        resp = s.loss_mask if s.loss_mask is not None else [1] * len(s.response_token_ids)
        mask[p:] = torch.tensor(resp, dtype=torch.bool)
        out.append(DrafterSequence(torch.tensor(s.prompt_token_ids + s.response_token_ids),
                                   hidden[row, col0:col0 + n].detach().to("cpu", dtype), mask))
    return out


def adapter_state_dict_names(lora_model) -> list[str]:
    """The names an adapter's safetensors file holds (peft's saved names)."""
    from trainers.lora import adapter_state_dict

    return list(adapter_state_dict(lora_model))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def learner_class(strategy: str) -> type[Learner]:
    """The learner class that runs ``learner.strategy``."""
    if strategy in Learner.STRATEGIES:
        return Learner
    if strategy == "deepspeed":
        from trainers.deepspeed_learner import DeepSpeedLearner  # imports DeepSpeed only when chosen

        return DeepSpeedLearner
    raise ValueError(f"learner.strategy={strategy!r} is not built; use one of "
                     f"{', '.join(Learner.STRATEGIES + ('deepspeed',))}")
