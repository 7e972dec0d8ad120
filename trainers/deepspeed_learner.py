"""The DeepSpeed ZeRO-3 learner (``learner.strategy=deepspeed``).

:class:`DeepSpeedLearner` is :class:`trainers.learner.Learner` with other strategy hooks: the policy
(:class:`trainers.distributed.LogProbModule`) is wrapped by a ZeRO-3 engine, which partitions parameters, gradients
and the AdamW state over the learner ranks (gloo on CPU through DeepSpeed's CPU accelerator, NCCL on CUDA). The
micro-batching, losses, data split over ranks and padding passes are the base class's.

Equal to the one-rank update:

- Accumulation is ours: the engine runs with ``gradient_accumulation_steps=1`` and
  ``managed_gradient_accumulation=false``, so every backward only accumulates this rank's gradient partitions and
  :meth:`_optimizer_step` (``engine.step``) is the boundary: clip to ``grad_clip``, AdamW step.
- DeepSpeed averages gradients over ranks; the losses are already normalized by the whole mini-batch's counts, so
  :meth:`_backward` scales each loss by the world size and the average becomes the sum.
- The fused log-prob kernels read the LM-head weight inside ``LogProbModule.forward`` without calling the head
  module, so that weight is registered as an external parameter of the log-prob module and stays gathered through
  its forward and backward (the tied embedding included). Kernel selection (``select_kernels``) runs after this
  set-up and reads the head's shape, which a partitioned parameter keeps in ``ds_shape`` (its tensor is empty).

A rank holds one process group for its life: DeepSpeed keeps handles to the group it first saw, so the group is not
destroyed and formed again within a process while a DeepSpeed learner may still run there.

Checkpoints have the base format (``model/`` in safetensors with HF names, ``learner_state.pt`` with the AdamW
state keyed by parameter name), gathered from the partitions one parameter at a time, so a checkpoint resumes
under any strategy and any rank count. The optimizer is torch's AdamW on the fp32 partitions (also with
``offload_optimizer``), whose state maps one to one to that format. The module is held in the compute dtype
(``model.dtype``); with bf16/fp16 ``model/`` holds those weights and ``learner_state.pt`` also the fp32 master
weights keyed by name (``master_weights``), so a DeepSpeed resume continues bit-exactly. The other strategies hold
their parameters in ``learner.param_dtype`` (the fp32 masters by default), write them to ``model/`` and read only
``model/``. The weight export for the engines is cast to their dtype on the device, as the base class's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainers import checkpoint as C
from trainers import distributed as D
from trainers.learner import Learner

_ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _import_deepspeed(device: torch.device):
    """DeepSpeed, with its accelerator matching the learner's device (a CPU learner on a GPU node runs on the CPU
    accelerator; the accelerator is fixed at its first use)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The engine places the module on the accelerator device LOCAL_RANK (torch's launcher sets it; Ray does not):
    # the learner's own device, which is the one GPU Ray gives each rank.
    os.environ["LOCAL_RANK"] = str(torch.cuda.current_device() if device.type == "cuda" else 0)
    import importlib
    import logging

    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm's attribute `torch` is torch)
    if device.type == "cpu" and hasattr(ds_torch_comm, "build_shm_op"):
        # The CPU accelerator JIT-compiles a shared-memory all-reduce op when its comm backend starts (a C++
        # toolchain and minutes at first use); only tensor-parallel inference uses it, never ZeRO training.
        ds_torch_comm.build_shm_op = lambda: None
    return deepspeed


def _host_copy(value: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """A copy of ``value`` in ``dtype`` on ``device`` (default the host), cast on its own device first (one copy,
    not two). Always a copy: a gathered parameter's memory is released after the gather."""
    out = value.detach().to(dtype or value.dtype).to(device)
    return out.clone() if out.dtype == value.dtype and value.device == out.device else out


class DeepSpeedLearner(Learner):
    """A learner rank whose policy is a DeepSpeed ZeRO-3 engine. Every public method that touches the model is a
    collective (as under fsdp2): the driver calls it on all ranks with the same arguments."""

    STRATEGIES: tuple[str, ...] = ("deepspeed",)

    # ---------------------------------------------------------------- strategy hooks
    def _load_dtype(self) -> torch.dtype:
        """The module is held in the compute dtype: in its bf16/fp16 mode ZeRO-3 keeps the fp32 master partitions
        (and fp32 gradient partitions and AdamW state) itself, whatever ``learner.param_dtype`` says."""
        return self.compute_dtype

    def _adapter_dtype(self) -> torch.dtype:
        """``model.lora``: the adapters are held like the rest of the module, in the compute dtype (ZeRO-3 keeps
        their fp32 master partitions)."""
        return self.compute_dtype

    def _ds_config(self, trainable: bool) -> dict:
        ds = self.cfg.deepspeed
        dtype = next(self.model.parameters()).dtype
        on_gpu = self.device.type == "cuda"
        zero: dict = {
            "stage": 3,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
            "stage3_param_persistence_threshold": ds.param_persistence_threshold,
            "contiguous_gradients": True,
            "overlap_comm": on_gpu,
        }
        if on_gpu and ds.offload_params:  # host memory is where the parameters already are on a CPU learner
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if on_gpu and trainable and ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        config: dict = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if trainable:
            config.update(
                gradient_clipping=self.cfg.grad_clip,
                managed_gradient_accumulation=False,  # engine.step() is the boundary: we accumulate ourselves
                zero_allow_untested_optimizer=True,  # torch's AdamW on the fp32 partitions
                zero_force_ds_cpu_optimizer=False,  # ... also when its state is offloaded to host memory
            )
        return config

    def _wrap(self, deepspeed, lm: torch.nn.Module, trainable: bool):
        """A ZeRO-3 engine around ``LogProbModule(lm)``; ``lm`` may sit in host memory (the base class loads sharded
        strategies there)."""
        config = self._ds_config(trainable)
        module = D.LogProbModule(lm)
        # Partition one parameter at a time, each moved to the device only for its turn (handed an unpartitioned
        # module, the engine would first move the whole model to the device); then the buffers, which stay whole.
        offload = self.device.type == "cuda" and "offload_param" in config["zero_optimization"]
        deepspeed.zero.Init(module=module, config_dict_or_path=config, remote_device="cpu" if offload else None,
                            pin_memory=offload)
        for sub in module.modules():
            for key, buf in sub._buffers.items():
                if buf is not None:
                    sub._buffers[key] = buf.to(self.device)
        head = lm.get_output_embeddings()
        if isinstance(getattr(head, "weight", None), torch.nn.Parameter):
            # The fused kernels read the LM-head weight in LogProbModule.forward, outside the head's own forward:
            # as an external parameter of the log-prob module it stays gathered through that forward and its
            # backward (the kernel is chosen after this set-up, so this holds for every kernel; the naive head
            # needs the weight at the end of the forward anyway).
            deepspeed.zero.register_external_parameter(module, head.weight)
        optimizer = None
        if trainable:
            # with model.lora the adapters alone (the frozen base is partitioned too, but has no optimizer state)
            optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=self.cfg.lr,
                                          betas=tuple(self.cfg.betas), weight_decay=self.cfg.weight_decay)
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        return engine

    def _setup_policy(self) -> None:
        deepspeed = _import_deepspeed(self.device)
        self.policy = self._wrap(deepspeed, self.model, trainable=True)
        self.optimizer = self.policy.optimizer  # the ZeRO-3 optimizer (torch AdamW inside, on fp32 partitions)
        self.ref_policy = None
        if self.ref_model is not None:  # inference-only ZeRO-3 engine: partitioned too, gathered layer by layer
            self.ref_policy = self._wrap(deepspeed, self.ref_model, trainable=False)

    def _zero_grad(self) -> None:
        # the gradient partitions restart (copy, not add) at the first backward after engine.step()
        self.policy.zero_grad()

    def _backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides the reduced gradient by the world size; the loss is this rank's share of a
        # mini-batch-normalized sum, so scaling by the world size makes the reduction a sum
        self.policy.backward(loss * self.world_size)

    def _optimizer_step(self) -> float:
        self.policy.step()
        return float(self.policy.get_global_grad_norm())

    def _gathered_parameters(self, everywhere: frozenset[str] = frozenset(), dtype: torch.dtype | None = None,
                             device: torch.device | str = "cpu", select=None):
        """(HF name, whole tensor or None, parameter) for every state-dict entry that ``select`` (a name predicate;
        None: all) keeps, in state-dict order, gathering one parameter at a time (a collective: every rank iterates
        to the end). Tied entries yield the same tensor object; the whole tensor is on ``device`` (default the CPU)
        on rank 0 (on every rank for the names in ``everywhere``), None elsewhere; cast to ``dtype`` (None: as it
        is) on the device, before the copy."""
        deepspeed = _import_deepspeed(self.device)
        done: dict[int, torch.Tensor | None] = {}
        entries = self.model.state_dict(keep_vars=True)
        wanted = {id(v) for n, v in entries.items() if n in everywhere}  # tied entries share their tensor
        for name, value in entries.items():
            if select is not None and not select(name):
                continue
            keep = self.rank == 0 or id(value) in wanted
            if id(value) not in done:  # the gathers are collectives: the same ones on every rank
                if hasattr(value, "ds_id"):
                    with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                        full = _host_copy(value, dtype, device) if keep else None
                else:  # a buffer: whole on every rank
                    full = _host_copy(value, dtype, device) if keep else None
                done[id(value)] = full
            yield name, done[id(value)], value

    def _whole_tensors(self, select=None, dtype: torch.dtype | None = None, everywhere: frozenset[str] = frozenset(),
                       copy: bool = True, device: torch.device | str = "cpu"):
        # ``copy`` is moot here: a gathered parameter is released after its copy, which is always made
        yielded: set[int] = set()
        for name, full, _ in self._gathered_parameters(everywhere, dtype, device, select=select):
            if full is not None and id(full) in yielded:
                full = full.clone()  # a tied head gets a tensor of its own, as safetensors wants
            elif full is not None:
                yielded.add(id(full))
            yield name, full

    # ---------------------------------------------------------------- checkpoints
    def _zero_optimizer(self):
        return self.policy.optimizer

    def _named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name as in Learner.save's optimizer state, parameter), tied parameters once."""
        return [(f"lm.{n}", p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _flat_states(self) -> list[dict]:
        zopt = self._zero_optimizer()
        return [zopt.optimizer.state[flat] for flat in zopt.fp32_partitioned_groups_flat]

    def _optimizer_state_dict(self) -> dict:
        """The AdamW state in the layout of ``Learner.save`` (full tensors keyed by name), gathered one parameter
        at a time; a collective, the tensors on rank 0 only."""
        from deepspeed.utils import safe_get_full_optimizer_state

        zopt = self._zero_optimizer()
        inner = zopt.optimizer
        names = self._named_trainable()
        flat_states = self._flat_states()
        state: dict[str, dict] = {}
        if all(s for s in flat_states):  # AdamW creates its state at the first step
            step = flat_states[0]["step"]
            for name, p in names:
                entry = {"step": step.detach().clone() if torch.is_tensor(step) else torch.tensor(float(step))}
                for key in _ADAM_STATE_KEYS:
                    full = safe_get_full_optimizer_state(p, key)
                    entry[key] = full.detach().to("cpu").clone() if self.rank == 0 else None
                state[name] = entry
        group = inner.param_groups[0]
        hyper = {k: group[k] for k in inner.defaults if k in group}
        return {"state": state, "param_groups": [{**hyper, "params": [n for n, _ in names]}]}

    def _load_optimizer_state(self, optim_sd: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        zopt = self._zero_optimizer()
        inner = zopt.optimizer
        saved = optim_sd.get("state") or {}
        names = self._named_trainable()
        present = [n for n, _ in names if n in saved]
        if present and len(present) != len(names):
            missing = sorted({n for n, _ in names} - set(present))
            raise RuntimeError(f"optimizer state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for g in inner.param_groups:  # the saved hyper-parameters, as torch's load_state_dict restores them
            for group in optim_sd.get("param_groups", [])[:1]:
                g.update({k: v for k, v in group.items() if k != "params" and k in g})
        if not present:  # a checkpoint saved before the first step: nothing to restore
            return
        step = saved[present[0]]["step"]
        for flat, flat_state in zip(zopt.fp32_partitioned_groups_flat, self._flat_states()):
            if not flat_state:  # as torch's AdamW creates it lazily
                inner.state[flat] = flat_state = {"step": torch.tensor(0.0, dtype=torch.float32),
                                                  **{k: torch.zeros_like(flat) for k in _ADAM_STATE_KEYS}}
            flat_state["step"] = torch.as_tensor(step, dtype=torch.float32).detach().clone().cpu()
        for name, p in names:
            for key in _ADAM_STATE_KEYS:
                safe_set_full_optimizer_state(p, saved[name][key].to(self.device, torch.float32), key)

    def _master_weights(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights, whole and keyed like the optimizer state (on rank 0; {} elsewhere), gathered one
        parameter at a time; None when the model itself is fp32 (its weights are the master copy). A collective."""
        if self.compute_dtype == torch.float32:
            return None
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self._named_trainable():
            full = safe_get_full_fp32_param(p)
            if self.rank == 0:
                out[name] = full.detach().to("cpu", torch.float32).clone()
        return out

    def _load_master_weights(self, masters: dict | None, path: Path) -> None:
        """Overwrite the master partitions (refreshed from the low-precision weights) with the saved fp32 copy."""
        if self.compute_dtype == torch.float32:
            return
        if not masters:
            print(f"[learner] {path} has no fp32 master weights (saved by another strategy or an fp32 run): "
                  "they restart from the saved model weights", flush=True)
            return
        from deepspeed.utils import safe_set_full_fp32_param

        names = self._named_trainable()
        missing = sorted({n for n, _ in names} - set(masters))
        if missing:
            raise RuntimeError(f"checkpoint {path}: master weights lack {len(missing)} parameters, e.g. {missing[:3]}")
        for name, p in names:
            safe_set_full_fp32_param(p, masters[name].to(self.device, torch.float32))

    def save(self, directory: str) -> None:
        """``Learner.save``'s format: the weights and the AdamW state gathered whole (one parameter at a time) and
        written by rank 0, so the checkpoint resumes under any strategy and rank count. A collective."""
        weights = {}
        for name, full, _ in self._gathered_parameters():
            if self.rank == 0:
                weights[name] = full  # a tied head shares its tensor, so save_pretrained stores it once
        optim_sd = self._optimizer_state_dict()
        masters = self._master_weights()
        if self.rank == 0:
            path = Path(directory)
            path.mkdir(parents=True, exist_ok=True)
            if self.lora_model is not None:  # adapter/ and the merged model/ (the base class's LoRA format)
                self._write_lora_model(path, weights)
            else:
                self.model.save_pretrained(path / "model", state_dict=weights)
            C.write_learner_state(path, optim_sd, self.num_updates, lora=self.lora_model is not None,
                                  **({"master_weights": masters} if masters is not None else {}))
            if self.drafter is not None:
                self.drafter.save(path)
        D.barrier()

    def load(self, directory: str) -> None:
        """Every rank reads the checkpoint (so ``directory`` must be on storage all learner nodes see); each keeps
        its partitions of the weights and of the AdamW state."""
        deepspeed = _import_deepspeed(self.device)
        path = Path(directory)
        if self.lora_model is not None:  # the adapter alone: the frozen base is model.path's
            weights = self._read_adapter(path)
        else:
            self._check_checkpoint_kind(path)
            weights = C.read_model_weights(path, self.model)
        state = C.read_learner_state(path)
        if state.get("format") != "fqn":
            raise RuntimeError(f"checkpoint {path} has an optimizer state keyed by parameter order (an older "
                               "format); resume it with learner.strategy=single")
        done: set[int] = set()
        for name, value in self.model.state_dict(keep_vars=True).items():
            if id(value) in done or (self.lora_model is not None and name not in weights):
                continue
            done.add(id(value))
            if hasattr(value, "ds_id"):
                with deepspeed.zero.GatheredParameters([value], modifier_rank=0):
                    value.data.copy_(weights[name].to(value.device, value.dtype))
            else:
                value.data.copy_(weights[name].to(value.device, value.dtype))
        self._zero_optimizer().refresh_fp32_params()  # the fp32 master partitions from the loaded weights
        self._load_master_weights(state.get("master_weights"), path)
        self._load_optimizer_state(state["optimizer"])
        self.num_updates = state["num_updates"]
        C.set_rng_state(state["rng"])
        if self.drafter is not None:
            self.drafter.load(path)
