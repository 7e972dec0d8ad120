"""The gloo weight transport without an engine: the wire format, a real gloo group between the learner's sender
(``trainers.weight_transport``) and vLLM's weight-transfer engine of ours (``rollout.weight_transfer``) in two
threads, with a stand-in model whose ``load_weights`` keeps what it receives; and ``sync.transport`` in the config.
"""

import threading

import pytest
import torch

from rl.config import Config, ConfigError, SyncConfig, load_config
from rl.weight_wire import ALIGN_BYTES, BucketMeta, dtype_name, layout, pack, unpack
from rollout.drafter.online import OnlineDrafterConfig
from tests.learner_fixtures import free_port, save_tiny_qwen2


def _meta(named: list[tuple[str, torch.Tensor]]) -> BucketMeta:
    return BucketMeta([n for n, _ in named], [dtype_name(t.dtype) for _, t in named], [list(t.shape) for _, t in named])


def test_wire_round_trip_is_bit_exact_and_aligned():
    g = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g).to(torch.bfloat16)),
             ("c", torch.randn(2, 3, generator=g).t()), ("d", torch.randn(1, generator=g).double())]
    meta = _meta(named)
    offsets, total = layout(meta)
    # a: 60 bytes at 0; b: 14 bytes at 64; c: 24 bytes at 128; d: 8 bytes at 192
    assert offsets == [0, 64, 128, 192] and total == 200 and all(o % ALIGN_BYTES == 0 for o in offsets)
    buf = pack(meta, [t for _, t in named])
    out = unpack(meta, buf)
    assert [n for n, _ in out] == ["a", "b", "c", "d"]
    for (_, want), (_, got) in zip(named, out):
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # a view: no copy on receipt
    with pytest.raises(ValueError, match=r"'b': metadata says bfloat16 \[7\], the tensor is float32 \[7\]"):
        pack(meta, [named[0][1], named[1][1].float(), named[2][1], named[3][1]])


class _Model(torch.nn.Module):
    """Stands in for vLLM's model: ``load_weights`` keeps a copy of what it is given and returns the names."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name.replace(".", "_"), torch.nn.Parameter(torch.zeros(shape)))
        self.names = {name.replace(".", "_"): name for name in shapes}
        self.received: dict[str, torch.Tensor] = {}

    def named_parameters(self, *args, **kwargs):
        for key, p in super().named_parameters(*args, **kwargs):
            yield self.names[key], p

    def load_weights(self, weights):
        for name, tensor in weights:
            self.received[name] = tensor.clone()
        return {name for name, _ in weights}


@pytest.fixture
def no_layerwise_reload(monkeypatch):
    """The stand-in model has no vLLM layers: count the layerwise-reload calls instead of running them."""
    import vllm.model_executor.model_loader.reload as reload

    calls = {"initialize": 0, "finalize": 0}
    monkeypatch.setattr(reload, "initialize_layerwise_reload", lambda m: calls.__setitem__("initialize", calls["initialize"] + 1))
    monkeypatch.setattr(reload, "finalize_layerwise_reload",
                        lambda m, c: calls.__setitem__("finalize", calls["finalize"] + 1))
    return calls


def _engine(model, backend: str = "gloo"):
    """``rollout.weight_transfer``'s engine for ``backend`` as vLLM's worker builds it (no vLLM config needed)."""
    from types import SimpleNamespace

    import rollout.weight_transfer as wt
    from rollout.vllm_plugin import WEIGHT_TRANSFER_ENGINES

    engine = object.__new__(getattr(wt, WEIGHT_TRANSFER_ENGINES[backend]))
    engine.device = torch.device("cpu")
    engine.parallel_config = SimpleNamespace(data_parallel_index=0, world_size=1, rank=0)
    engine.model = engine._default_model = model
    engine.model_config = engine._default_model_config = None
    engine.group, engine._store, engine._loaded, engine._active, engine.rank = None, None, set(), False, -1
    return engine


def _run_pair(sender_fn, engine, timeout_s: float = 10.0):
    """Open a 2-rank gloo group (sender rank 0 in a thread, ``engine`` at rank 1 here); run ``sender_fn(sender)``
    in the thread; returns the thread's exception, if any, after ``engine`` is joined."""
    from trainers.weight_transport import GlooSender

    port = free_port()
    errors = []

    def run():
        try:
            sender = GlooSender("127.0.0.1", port, 2, timeout_s)
            sender_fn(sender)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    engine.init_transfer_engine(engine.init_info_cls(master_address="127.0.0.1", master_port=port, rank_offset=1,
                                                     world_size=2, timeout_s=timeout_s))
    return thread, errors


def test_gloo_sync_delivers_the_learners_weights_bit_exactly(tmp_path, no_layerwise_reload):
    """A real learner's export (fp32 masters cast to bf16 for the engines, buckets of whole decoder layers) arrives
    in the engine's ``load_weights`` equal to the learner's state dict, tensor for tensor."""
    learner = _learner(tmp_path)
    want = {k: v.detach().to(torch.bfloat16) for k, v in learner.model.state_dict().items()}
    n = learner.begin_weight_export(50_000, copy=False)
    metas = learner.weight_bucket_meta()
    assert n == len(metas) == 4  # embedding, layer 0, layer 1, final norm + tied head
    model = _Model({k: tuple(v.shape) for k, v in want.items()})
    engine = _engine(model)
    thread, errors = _run_pair(lambda s: setattr(learner, "_sender", s) or [learner.send_weight_bucket(b)
                                                                            for b in range(n)], engine)
    engine.start_weight_update()
    for meta in metas:
        engine.update_weights(meta)
    engine.finish_weight_update()
    thread.join()
    assert not errors and no_layerwise_reload == {"initialize": 1, "finalize": 1}
    assert sorted(model.received) == sorted(want)
    for name, tensor in want.items():
        assert model.received[name].dtype == torch.bfloat16 and torch.equal(model.received[name], tensor), name
    assert engine.stats["bytes"] >= sum(t.numel() * 2 for t in want.values())
    # the live fp32 parameters were not touched by the export (copy=False packs them without a clone)
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())


def test_gloo_sync_missing_a_parameter_fails_at_finish(no_layerwise_reload):
    model = _Model({"a": (2,), "b": (3,)})
    engine = _engine(model)
    meta = _meta([("a", torch.ones(2))])
    thread, errors = _run_pair(lambda s: s.send(meta, [torch.ones(2)]), engine)
    engine.start_weight_update()
    engine.update_weights({**meta.as_dict(), "bucket": 0, "num_buckets": 1})
    with pytest.raises(RuntimeError, match=r"left 1 parameter\(s\).*\['b'\]"):
        engine.finish_weight_update()
    thread.join()
    assert not errors and no_layerwise_reload["finalize"] == 1  # the old weights are back in the unloaded layers


def test_gloo_sync_that_breaks_off_names_the_bucket_and_restores(no_layerwise_reload):
    """The sender stops after the first of two buckets: the receive of the second times out (1 s here), the
    layerwise reload is finalized at once (the layers that did not arrive keep their previous weights) and the
    error names the bucket."""
    model = _Model({"a": (2,), "b": (3,)})
    engine = _engine(model)
    metas = [_meta([("a", torch.ones(2))]), _meta([("b", torch.ones(3))])]
    done = threading.Event()
    thread, errors = _run_pair(lambda s: (s.send(metas[0], [torch.ones(2)]), done.wait(10)), engine, timeout_s=1.0)
    engine.start_weight_update()
    engine.update_weights({**metas[0].as_dict(), "bucket": 0, "num_buckets": 2})
    with pytest.raises(RuntimeError, match=r"bucket 2/2 \(1 tensors, first \['b'\]\) did not arrive at transfer rank 1"):
        engine.update_weights({**metas[1].as_dict(), "bucket": 1, "num_buckets": 2})
    done.set()
    thread.join()
    assert no_layerwise_reload == {"initialize": 1, "finalize": 1} and not engine._active
    assert sorted(model.received) == ["a"]


def _cfg(**sections) -> Config:
    return Config.model_validate(sections)


GPU_ENGINES = {"num_gpus_per_engine": 1}


@pytest.mark.parametrize("sections, want", [
    ({}, "gloo"),  # CPU, disaggregated
    ({"placement": {"mode": "colocated"}}, "ipc"),  # one learner rank shares its node with its engine
    ({"placement": {"mode": "colocated"}, "rollout": {"num_engines": 2},
      "learner": {"strategy": "fsdp2", "num_ranks": 2}}, "gloo"),  # per-rank shared buffers are not built
    ({"rollout": GPU_ENGINES, "learner": {"num_gpus": 1}}, "nccl"),
    ({"rollout": GPU_ENGINES}, "object_store"),  # engines on GPUs, learner on CPU: no transport spans both
    ({"rollout": {**GPU_ENGINES, "num_engines": 2}, "learner": {"num_gpus": 1, "strategy": "fsdp2", "num_ranks": 2},
      "placement": {"mode": "colocated"}}, "object_store"),  # NCCL cannot join two processes on one GPU
    ({"rollout": GPU_ENGINES, "learner": {"num_gpus": 1}, "placement": {"mode": "colocated"}}, "ipc"),
])
def test_auto_transport_follows_the_placement(sections, want):
    cfg = _cfg(**sections)
    assert cfg.sync.transport == "auto" and cfg.weight_transport() == want


def test_transport_config():
    assert _cfg(sync={"transport": "object_store"}).weight_transport() == "object_store"
    assert _cfg(sync={"transport": "gloo"}, rollout=GPU_ENGINES).weight_transport() == "gloo"
    with pytest.raises(ValueError, match=r"sync.transport=nccl needs the learner and the engines on GPUs"):
        _cfg(sync={"transport": "nccl"})
    with pytest.raises(ValueError, match=r"sync.transport=nccl cannot join two processes on one GPU"):
        _cfg(sync={"transport": "nccl"}, rollout=GPU_ENGINES, learner={"num_gpus": 1},
             placement={"mode": "colocated"})
    with pytest.raises(ValueError, match=r"sync.transport=ipc .* needs placement.mode=colocated and "
                                         r"learner.num_ranks=1 \(got disaggregated, 1\)"):
        _cfg(sync={"transport": "ipc"})
    with pytest.raises(ValueError, match="transport"):
        SyncConfig(transport="shm")
    with pytest.raises(ValueError):
        SyncConfig(transport_timeout_s=0)


def test_transport_override_in_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sync: {transport: object_store, transport_timeout_s: 30}\n")
    cfg = load_config(recipe, ["sync.transport=gloo"])
    assert cfg.sync.transport == "gloo" and cfg.sync.transport_timeout_s == 30
    with pytest.raises(ConfigError, match="transport"):
        load_config(recipe, ["sync.transprot=gloo"])


def test_gloo_drafter_publish_delivers_the_drafters_own_weights(tmp_path, no_layerwise_reload):
    """The drafter's own weights (no shared embedding or LM head) go as one bucket, equal to what the object-store
    publish sends; the engine's completeness check is for the target only, so the drafter's update finishes."""
    from safetensors.torch import load as st_load
    from transformers import AutoModelForCausalLM

    from rl.algorithms import AlgorithmConfig
    from rollout.drafter.checkpoint import save_drafter
    from rollout.drafter.model import Drafter
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    model_dir = save_tiny_qwen2(tmp_path / "model", tie=False)
    drafter_dir = save_drafter(Drafter.from_target(AutoModelForCausalLM.from_pretrained(model_dir), seed=0),
                               tmp_path / "drafter")
    learner = Learner(model_dir, LearnerSettings(micro_batch_tokens=64), AlgorithmConfig(kl_coef=0.0), temperature=1.0)
    section = load_config(None, ["drafter.mode=fixed"]).drafter
    learner.drafter_setup(OnlineDrafterConfig.from_section(section.model_dump()), str(drafter_dir))
    want = st_load(learner.export_drafter())
    meta = learner.drafter_transfer_meta()
    assert sorted(meta["names"]) == sorted(want) and meta["num_buckets"] == 1
    assert not any("embed_tokens" in n or "lm_head" in n for n in meta["names"])
    target = _Model({"model.embed_tokens.weight": (50, 64)})
    draft = _Model({n: tuple(t.shape) for n, t in want.items()})
    engine = _engine(target)
    thread, errors = _run_pair(lambda s: setattr(learner, "_sender", s) or learner.send_drafter(), engine)
    engine.set_weight_update_target(draft, None)  # what vLLM's start_draft_weight_update does first
    engine.start_weight_update()
    engine.update_weights(meta)
    engine.finish_weight_update()
    engine.reset_weight_update_target()
    thread.join()
    assert not errors and sorted(draft.received) == sorted(want) and not target.received
    for name, tensor in want.items():
        assert torch.equal(draft.received[name], tensor), name


def _learner(tmp_path):
    from rl.algorithms import AlgorithmConfig
    from trainers.learner import Learner
    from trainers.settings import LearnerSettings

    path = save_tiny_qwen2(tmp_path / "m")
    cfg = LearnerSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=512,
                          mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=0,
                          param_dtype="float32")
    learner = Learner(path, cfg, AlgorithmConfig(policy_loss="ppo_clip"), temperature=1.0, dtype="float32",
                      export_dtype="bfloat16")
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # not round numbers
    return learner


def test_ipc_sync_delivers_the_learners_weights_through_shared_files(tmp_path, no_layerwise_reload):
    """``ipc`` on CPU: each bucket is packed into a shared-memory file the engine maps (no bytes sent); what
    arrives equals the learner's state dict bit for bit; at most two buckets' files exist at once, none after the
    sync's release."""
    from trainers.weight_transport import IpcSender

    learner = _learner(tmp_path)
    want = {k: v.detach().to(torch.bfloat16) for k, v in learner.model.state_dict().items()}
    shm = tmp_path / "shm"
    shm.mkdir()
    learner.init_weight_transport(None, None, 0, 10.0, "ipc")
    learner._sender.directory = str(shm)
    assert isinstance(learner._sender, IpcSender)
    n = learner.begin_weight_export(50_000, copy=False)
    metas = learner.weight_bucket_meta()
    model = _Model({k: tuple(v.shape) for k, v in want.items()})
    engine = _engine(model, "rl_ipc")
    engine.init_transfer_engine(engine.init_info_cls())
    engine.start_weight_update()
    live = []
    for b in range(n):
        sent = learner.send_weight_bucket(b)
        live.append(len(list(shm.iterdir())))
        engine.update_weights({**metas[b], "handle": sent["handle"]})
        assert sent["send_s"] == 0.0 and sent["bytes"] == layout(BucketMeta(metas[b]["names"], metas[b]["dtype_names"],
                                                                             metas[b]["shapes"]))[1]
    engine.finish_weight_update()
    learner.release_weight_buffers()
    assert n == 4 and live == [1, 2, 2, 2] and not list(shm.iterdir())
    assert sorted(model.received) == sorted(want)
    for name, tensor in want.items():
        assert model.received[name].dtype == torch.bfloat16 and torch.equal(model.received[name], tensor), name
    assert no_layerwise_reload == {"initialize": 1, "finalize": 1}


def test_ipc_handle_that_cannot_be_opened_names_the_bucket_and_restores(tmp_path, no_layerwise_reload):
    """A handle whose file is not on the engine's node (or was released) ends the sync at that bucket, with the
    previous weights put back; a handle of the wrong size is refused before it is mapped."""
    from trainers.weight_transport import IpcSender

    model = _Model({"a": (2,), "b": (3,)})
    engine = _engine(model, "rl_ipc")
    engine.init_transfer_engine(engine.init_info_cls())
    sender = IpcSender(torch.device("cpu"), directory=str(tmp_path))
    metas = [_meta([("a", torch.ones(2))]), _meta([("b", torch.ones(3))])]
    engine.start_weight_update()
    first = sender.send(metas[0], [torch.ones(2)])
    engine.update_weights({**metas[0].as_dict(), "bucket": 0, "num_buckets": 2, "handle": first["handle"]})
    second = sender.send(metas[1], [torch.ones(3)])
    sender.close()  # the file is gone before the engine maps it
    with pytest.raises(RuntimeError, match=r"rl_ipc weight transfer: bucket 2/2 \(1 tensors, first \['b'\]\) did not "
                                           r"arrive at transfer rank 0: shared weight buffer .* is not on this node"):
        engine.update_weights({**metas[1].as_dict(), "bucket": 1, "num_buckets": 2, "handle": second["handle"]})
    assert no_layerwise_reload == {"initialize": 1, "finalize": 1} and not engine._active
    assert sorted(model.received) == ["a"] and torch.equal(model.received["a"], torch.ones(2))
    from rl.weight_wire import open_shared_buffer

    with pytest.raises(ValueError, match="the shared buffer holds 12 bytes, the bucket needs 16"):
        open_shared_buffer({"path": "x", "nbytes": 12}, 16, torch.device("cpu"))


class _GlooAsNccl:
    """vLLM's ``PyNcclCommunicator`` on CPU: the same ``broadcast(tensor, src, stream)`` and ``destroy``, over a gloo
    group, so the ``nccl`` transport's own code (``NcclSender``, ``NcclWeightTransferEngine``) runs here."""

    def __init__(self, address: str, port: int, rank: int, world_size: int, device) -> None:
        from trainers.weight_transport import open_gloo_group

        self.device = device
        self.group, self._store = open_gloo_group(address, port, rank, world_size, 10.0)

    def broadcast(self, tensor, src: int, stream=None) -> None:
        from trainers.weight_transport import broadcast

        assert src == 0 and stream is not None  # the NCCL code passes the current stream
        broadcast(self.group, tensor)

    def destroy(self) -> None:
        self.group = None


def test_nccl_sync_runs_its_own_code_over_a_gloo_stand_in(tmp_path, monkeypatch, no_layerwise_reload):
    """The ``nccl`` transport with vLLM's communicator replaced by a gloo one and the CUDA stream by a stub: a real
    learner's export arrives bit for bit through ``NcclSender`` and the ``rl_nccl`` engine, at the engine's own rank
    offset; the sender synchronizes its stream after every bucket."""
    from types import SimpleNamespace

    import vllm.distributed.weight_transfer.nccl_common as nccl_common

    from trainers.weight_transport import NcclSender

    joined = []
    monkeypatch.setattr(nccl_common, "stateless_init_process_group",
                        lambda a, p, rank, world, device: joined.append(rank) or _GlooAsNccl(a, p, rank, world, device))
    syncs = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(synchronize=lambda: syncs.append(1)))
    learner = _learner(tmp_path)
    want = {k: v.detach().to(torch.bfloat16) for k, v in learner.model.state_dict().items()}
    port = free_port()
    errors = []

    def send():
        try:
            learner._sender = NcclSender("127.0.0.1", port, 2, 10.0, torch.device("cpu", 0))
            for b in range(n):
                learner.send_weight_bucket(b)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    n = learner.begin_weight_export(50_000, copy=False)
    metas = learner.weight_bucket_meta()
    model = _Model({k: tuple(v.shape) for k, v in want.items()})
    engine = _engine(model, "rl_nccl")
    thread = threading.Thread(target=send)
    thread.start()
    engine.init_transfer_engine(engine.init_info_cls(master_address="127.0.0.1", master_port=port, rank_offset=1,
                                                     world_size=2, timeout_s=10.0))
    engine.start_weight_update()
    for meta in metas:
        engine.update_weights(meta)
    engine.finish_weight_update()
    thread.join()
    assert not errors and sorted(joined) == [0, 1] and engine.rank == 1 and len(syncs) == n == 4
    assert sorted(model.received) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(model.received[name], tensor), name
    engine.shutdown()
    assert engine.group is None
