"""The learner's token log-probs and the choice of kernels that compute them (``learner.kernels``).

:func:`token_logprobs` runs a micro-batch (``trainers.batching``) through the model: with the ``naive`` kernel the
model's own head gives the whole [tokens, vocab] logits; the fused kernels (``chunked`` / ``triton``,
``trainers.fused_logprob``) take the final hidden states and the LM-head weight and never hold those logits.
:func:`select_kernels` resolves the configured choice for the model and device once at start-up, and
:func:`apply_kernels` sets packed attention up and checks the choice on a probe against padded + naive, falling
back where it differs (docs/architecture.md, "Learner kernels").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rl.config import KernelsConfig
from rl.types import TrainSample
from trainers.batching import MicroBatch, gather_response, make_micro_batches, move_micro_batch
from trainers.distributed import whole_shape
from trainers.fused_logprob import IGNORE_INDEX, LOGPROB_KERNELS, logprob_kernel_unavailable
from trainers.packing import (
    packed_forward_kwargs,
    packing_unsupported,
    select_attention_backend,
    use_packed_attention,
)


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


def fused_head_unsupported(model) -> str | None:
    """Why the fused kernels cannot reproduce ``model``'s logits from hidden states @ LM-head weight (None if
    they can)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or len(whole_shape(head.weight)) != 2:
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
            logits_bytes = micro_batch_tokens * whole_shape(model.get_output_embeddings().weight)[0] * 4
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
    vocab = min(model.config.vocab_size, whole_shape(model.get_input_embeddings().weight)[0])
    probe = [TrainSample(torch.randint(0, vocab, (n,), generator=g).tolist(),
                         torch.randint(0, vocab, (m,), generator=g).tolist(), [0.0] * m, 0.0, "probe")
             for n, m in ((3, 5), (4, 2))]

    def run(choice: KernelChoice) -> list[float]:
        mb = move_micro_batch(make_micro_batches(probe, 1 << 20, packed=choice.packed)[0], device)
        with torch.no_grad():
            logp = (logprobs_fn(mb, choice) if logprobs_fn is not None
                    else token_logprobs(model, mb, 1.0, kernels=choice)[0])
        by_sample = dict(zip(mb.index, gather_response(mb, probe, logp.float().cpu())))
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

