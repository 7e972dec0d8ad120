"""The worker extension's lookups against vLLM's own worker and model-runner classes, without starting an engine.

CUDA runs vLLM's Model Runner V2 by default, which the CPU build cannot start (it needs Triton's GPU backend), so its
drafter lookup is checked here on the real V2 classes, built without their constructors. A fake model stands in for
vLLM's model in the completeness check of a sync: it loads what it is given, as vLLM models do.
"""

import pytest
import torch
from safetensors.torch import save as st_save

from rollout.worker_ext import WeightSyncExtension


def _v2_worker(draft: torch.nn.Module):
    """A vLLM ``Worker`` with the extension mixed in (as ``worker_extension_cls`` does) and a Model Runner V2 whose
    speculator is vLLM's EAGLE speculator holding ``draft``."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu.spec_decode.eagle.speculator import EagleSpeculator
    from vllm.v1.worker.gpu_worker import Worker

    speculator = object.__new__(EagleSpeculator)
    speculator.model = draft
    runner = object.__new__(V2Runner)
    runner.speculator = speculator
    worker = object.__new__(type("ExtendedWorker", (WeightSyncExtension, Worker), {}))
    worker.model_runner = runner
    return worker


def test_drafter_is_found_on_model_runner_v2():
    draft = torch.nn.Linear(2, 2)
    worker = _v2_worker(draft)
    assert not hasattr(worker.model_runner, "drafter")  # V2 has no `drafter`: the old lookup raised here
    assert worker._rl_draft_model() is draft
    assert "vllm.v1.worker.gpu.model_runner" in worker.rl_model_runner_module()


class _Model(torch.nn.Module):
    """Two parameters; ``load_weights`` returns the names it was given, like a vLLM model (the tensors arrive on the
    meta device here, so nothing is copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(2))
        self.b = torch.nn.Parameter(torch.zeros(3))

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        names = set()
        for n, t in weights:
            assert t.shape == params[n].shape
            names.add(n)
        return names


class _CudaLikeWorker(WeightSyncExtension):
    """The per-bucket (CUDA) load path on a CPU model: the device check is the only difference."""

    def __init__(self) -> None:
        self.model = _Model()

    def _rl_model(self):
        return self.model

    def _rl_device(self):
        return torch.device("meta")  # neither cpu nor cuda: the live load_weights path, no synchronize needed


@pytest.fixture
def no_cuda_sync(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


def test_bucketed_sync_needs_every_parameter(no_cuda_sync):
    w = _CudaLikeWorker()
    w.rl_load_weight_bucket(st_save({"a": torch.ones(2)}), 1, False)
    assert w.rl_load_weight_bucket(st_save({"b": torch.ones(3)}), 1, True)["version"] == 1
    # a sync whose buckets lack `b` fails at its last bucket, and the version does not move
    w.rl_load_weight_bucket(st_save({"a": torch.full((2,), 2.0)}), 2, False)
    with pytest.raises(RuntimeError, match=r"left 1 parameter\(s\).*\['b'\]"):
        w.rl_load_weight_bucket(st_save({"a": torch.full((2,), 2.0)}), 2, True)
    assert w.rl_weight_version() == 1
    # a later complete sync starts afresh
    w.rl_load_weight_bucket(st_save({"a": torch.ones(2), "b": torch.ones(3)}), 3, True)
    assert w.rl_weight_version() == 3
