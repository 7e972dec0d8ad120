"""LoRA on the sharded learners, on gloo (CPU): FSDP2 and DeepSpeed ZeRO-3 on 2 ranks train the adapter as the
unsharded learner does.

Against the single strategy, for each sharded one: the same probe log-probs before the update, the same loss and
gradient norm, the same adapter after it (what every sync sends: ``export_adapter`` gathers the adapter's shards
alone), a checkpoint whose ``adapter/`` and merged ``model/`` equal the single strategy's, and a resume of the
single strategy's checkpoint on 2 ranks whose next update is the single strategy's next update.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load as st_load
from safetensors.torch import load_file

from rl.algorithms import AlgorithmConfig
from tests.learner_fixtures import free_port, random_samples, save_tiny_qwen2
from trainers.learner import learner_class
from trainers.settings import LearnerSettings

pytest.importorskip("peft")

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
CFG = LearnerSettings(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=24,
                      mini_batches_per_step=2, epochs_per_step=1, old_logprob_source="learner", num_gpus=0,
                      lora=LORA, deepspeed={"param_persistence_threshold": 0})
ALGO = AlgorithmConfig(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean",
                       kl_coef=0.1, kl_in="loss", kl_estimator="k3")
METRICS = ("loss/policy", "loss/kl", "loss/total", "loss/grad_norm")
PROBE = [([3, 7, 11], [5, 9, 2, 14]), ([1, 2], [40, 41, 42])]


def _adapter(files: dict) -> dict[str, torch.Tensor]:
    return st_load(files["adapter_model.safetensors"])


def _steps(learner, out_dir: str) -> tuple[dict, dict]:
    """Probe, one update, export, save, a second update, export (every call a collective on a sharded learner);
    the results and the exported adapters' files."""
    res = {"probe": learner.probe_logprobs(PROBE), "metrics": learner.train_step(random_samples())}
    adapters = {"step1": learner.export_adapter()}
    learner.save(os.path.join(out_dir, "ck"))
    res["next_metrics"] = learner.train_step(random_samples(seed=1))
    adapters["step2"] = learner.export_adapter()
    return res, adapters


def _rank_main(rank, world, port, model_dir, out_dir, strategy, resume_from):
    torch.set_num_threads(1)
    cls = learner_class(strategy)
    make = lambda: cls(model_dir, CFG.replace(strategy=strategy), ALGO, temperature=0.8, rank=rank,  # noqa: E731
                       world_size=world, master=("127.0.0.1", port))
    res, adapters = _steps(make(), out_dir)
    if resume_from:
        resumed = make()
        resumed.load(resume_from)
        res["resumed_num_updates"] = resumed.num_updates
        res["resumed_metrics"] = resumed.train_step(random_samples(seed=1))
        adapters["resumed"] = resumed.export_adapter()
    if rank == 0:
        for key, files in adapters.items():
            with open(os.path.join(out_dir, f"{key}.safetensors"), "wb") as f:
                f.write(files["adapter_model.safetensors"])
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f)
    from trainers import distributed as D

    D.barrier()  # the ranks leave together (see test_deepspeed)
    D.destroy()


def _run(world, model_dir, out_dir, strategy, resume_from=None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_rank_main, args=(world, free_port(), model_dir, str(out_dir), strategy, resume_from), nprocs=world,
             join=True)
    with open(os.path.join(out_dir, "result.json")) as f:
        res = json.load(f)
    for key in ("step1", "step2", "resumed"):
        path = os.path.join(out_dir, f"{key}.safetensors")
        if os.path.exists(path):
            res[key] = load_file(path)
    return res


def _max_abs(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_sharded")
    model_dir = save_tiny_qwen2(root / "model")
    learner = learner_class("single")(model_dir, CFG.replace(strategy="single"), ALGO, temperature=0.8)
    res, adapters = _steps(learner, str(root / "single"))
    res.update({k: _adapter(v) for k, v in adapters.items()})
    return model_dir, root, res


@pytest.mark.multiproc
@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed"])
def test_sharded_lora_equals_the_single_learner(single, strategy):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    model_dir, root, ref = single
    got = _run(2, model_dir, root / strategy, strategy, resume_from=str(root / "single" / "ck"))
    # the adapters start equal (rank 0's A, B = 0): the probe before any update is the base's, on every strategy
    assert max(abs(a - b) for r, g in zip(ref["probe"], got["probe"]) for a, b in zip(r, g)) < 1e-5
    for key in METRICS:
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4, abs=1e-6), key
    # what the sync sends: the whole adapter (28 tensors: 2 layers x 7 projections x A, B), equal after each step
    assert len(got["step1"]) == 28
    assert _max_abs(got["step1"], ref["step1"]) < 2e-5
    assert _max_abs(got["step2"], ref["step2"]) < 5e-5
    moved = _max_abs(ref["step2"], ref["step1"])
    assert moved > 1e-3  # the comparison above is not of two unmoved adapters
    # the checkpoint: adapter/ and the merged model/ as the single strategy writes them
    ck, ref_ck = root / strategy / "ck", root / "single" / "ck"
    assert _max_abs(load_file(ck / "adapter" / "adapter_model.safetensors"),
                    load_file(ref_ck / "adapter" / "adapter_model.safetensors")) < 2e-5
    # (the fixture ties its LM head to the embedding: a checkpoint may store the head once, under the embedding)
    merged = {k: v for k, v in load_file(ck / "model" / "model.safetensors").items() if k != "lm_head.weight"}
    ref_merged = {k: v for k, v in load_file(ref_ck / "model" / "model.safetensors").items() if k != "lm_head.weight"}
    assert len(merged) == 2 * 12 + 2 and _max_abs(merged, ref_merged) < 2e-5  # 12 tensors a layer, embedding, norm
    state = torch.load(ck / "learner_state.pt", weights_only=False)
    assert state["lora"] is True and len(state["optimizer"]["state"]) == 28  # AdamW state of the adapter alone
    # 2 ranks resume the single strategy's checkpoint: the next update is the single strategy's next update
    assert got["resumed_num_updates"] == 2  # 2 mini-batches per step
    for key in METRICS:
        assert got["resumed_metrics"][key] == pytest.approx(ref["next_metrics"][key], rel=1e-4, abs=1e-6), key
    assert _max_abs(got["resumed"], ref["step2"]) < 5e-5
