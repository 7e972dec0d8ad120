"""vLLM worker extension: receives new policy weights inside the engine's worker process.

Loaded by name through ``LLM(worker_extension_cls="rollout.worker_ext.WeightSyncExtension")``; its methods
are called with ``llm.collective_rpc(name, args=...)``. Method names must not clash with the worker's own
(the CPU worker already has ``update_weights``).

Weights arrive as safetensors bytes, because tensors passed as ``collective_rpc`` arguments are not
rebuilt as tensors on the CPU build. Two ways to load them, chosen by the device the model lives on:

- CPU: the CPU backend repacks linear weights once the engine runs, so the model's plain ``load_weights``
  fails; vLLM's in-place reload (``model_runner.reload_weights``) takes HF-named checkpoint tensors and
  re-runs the repacking.
- CUDA: the model's ``load_weights`` works on live CUDA parameters (tensors copied to the device first).

Every sync is checked for completeness: the names the model's ``load_weights`` reports loaded, over all buckets,
must cover every parameter of the model, so a tensor missing from the learner's export fails the sync instead of
leaving a stale layer behind (vLLM itself only logs that).

``rl_load_drafter_weights`` does the same for the speculative drafter module, found through the worker's
``get_draft_model()`` (Model Runner V1 keeps it in ``model_runner.drafter``, V2, the CUDA default, in
``model_runner.speculator``).
"""

from __future__ import annotations

import time

import torch


class WeightSyncExtension:
    """Mixed into vLLM's worker class; ``self.model_runner`` is the worker's model runner."""

    def _rl_model(self):
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def _rl_device(self) -> torch.device:
        for p in self._rl_model().parameters():
            if p.numel() > 0:
                return p.device
        return torch.device("cpu")

    def _rl_draft_model(self):
        """The drafter module of a model-based speculative config, or None (the worker's ``get_draft_model``, which
        knows V1's ``drafter`` and V2's ``speculator`` and unwraps CUDA-graph wrappers)."""
        return self.get_draft_model() if hasattr(self, "get_draft_model") else self.model_runner.get_draft_model()

    def rl_model_runner_module(self) -> str:
        """The module of the worker's model runner (``vllm.v1.worker.gpu.model_runner`` is V2)."""
        return type(self.model_runner).__module__

    def rl_load_weight_bucket(self, blob: bytes, version: int, final: bool) -> dict:
        """Load one bucket of the weights (safetensors bytes, HF names, whole decoder layers); ``final`` marks the
        last bucket of a sync, after which the worker reports ``version``. On CUDA each bucket goes into the live
        parameters at once; on CPU the buckets are kept until the last one and then reloaded together (the
        in-place reload re-runs the repacking of every layer, and restores layers missing from its input)."""
        from safetensors.torch import load as st_load

        t0 = time.perf_counter()
        items = list(st_load(bytes(blob)).items())
        model = self._rl_model()
        device = self._rl_device()
        if getattr(self, "_rl_staged_version", None) != int(version):  # a new sync (or one that broke off)
            self._rl_staged, self._rl_loaded, self._rl_staged_version = [], set(), int(version)
        if device.type == "cpu":
            self._rl_staged.extend(items)
            if final:
                staged, self._rl_staged = self._rl_staged, []
                self._rl_loaded |= _loaded_names(model, lambda: self.model_runner.reload_weights(
                    weights_iterator=iter(staged), is_checkpoint_format=True))
        else:
            self._rl_loaded |= set(model.load_weights(weights=[(n, t.to(device, non_blocking=True)) for n, t in items]))
            torch.cuda.synchronize(device)
        if final:
            loaded, self._rl_loaded, self._rl_staged_version = self._rl_loaded, set(), None
            missing = sorted({n for n, _ in model.named_parameters()} - loaded)
            if missing:
                raise RuntimeError(f"weight sync to version {version} left {len(missing)} parameter(s) of the engine's "
                                   f"model unloaded (the learner's export lacks them): {missing[:8]}")
            self._rl_weight_version = int(version)
        return {"version": self.rl_weight_version(), "load_s": time.perf_counter() - t0, "num_tensors": len(items)}

    def rl_weight_version(self) -> int:
        return int(getattr(self, "_rl_weight_version", 0))

    def rl_set_weight_version(self, version: int) -> int:
        """The version a complete sync through vLLM's weight-transfer API brought (``Engine.finish_weight_update``)."""
        self._rl_weight_version = int(version)
        return self._rl_weight_version

    def rl_weight_transfer_stats(self) -> dict:
        """Seconds this worker's transfer engine spent receiving and loading during the last sync, and its bytes."""
        engine = getattr(self, "weight_transfer_engine", None)
        return dict(getattr(engine, "stats", None) or {"recv_s": 0.0, "load_s": 0.0, "bytes": 0.0})

    def rl_load_drafter_weights(self, blob: bytes) -> dict:
        """Load the speculative drafter's own weights (safetensors bytes, EAGLE checkpoint names such as
        ``fc.weight``, ``layers.0.*``; the shared embedding and LM head stay the target's)."""
        from safetensors.torch import load as st_load

        model = self._rl_draft_model()
        if model is None:
            raise RuntimeError("this engine has no model-based speculative drafter (start it with a "
                               "speculative_config of method 'eagle')")
        t0 = time.perf_counter()
        items = list(st_load(bytes(blob)).items())
        device = next((p.device for p in model.parameters() if p.numel() > 0), torch.device("cpu"))
        if device.type == "cpu":
            # As for the target: the live CPU model's load_weights fails on repacked weights; vLLM's in-place
            # reload re-runs the loading and repacking for the drafter module.
            from vllm.model_executor.model_loader.reload.inplace import reload_weights

            reload_weights(self.model_runner.vllm_config, model, weights_iterator=iter(items), weights_path=None,
                           is_checkpoint_format=True)
        else:
            model.load_weights([(n, t.to(device, non_blocking=True)) for n, t in items])
            torch.cuda.synchronize(device)
        return {"load_s": time.perf_counter() - t0, "num_tensors": len(items)}


def _loaded_names(model: torch.nn.Module, run) -> set[str]:
    """The parameter names ``model.load_weights`` reports while ``run()`` reloads it (vLLM's in-place reload calls
    it and drops the answer)."""
    own = model.load_weights
    seen: set[str] = set()

    def load_weights(weights):
        names = own(weights)
        seen.update(names or ())
        return names

    model.load_weights = load_weights
    try:
        run()
    finally:
        del model.load_weights
    return seen
