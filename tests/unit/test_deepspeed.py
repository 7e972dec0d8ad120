"""DeepSpeed ZeRO-3 learner on gloo (CPU): 1 rank vs 2 ranks vs the unsharded learner give the same log-probs, loss
and update, with the naive head and with a fused log-prob kernel (the LM-head weight read outside its module);
a checkpoint resumes with the same next step, across rank counts and into the single strategy.

Ranks run in spawned processes with DeepSpeed's CPU accelerator (which falls back to gloo without oneCCL). Every
parameter is partitioned (param_persistence_threshold=0), so the tiny model really is sharded.
"""

import json
import os

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")

import torch.multiprocessing as mp
from safetensors.torch import load as st_load

from rl.algorithms import AlgorithmConfig
from tests.learner_fixtures import free_port, random_samples, save_tiny_qwen2
from trainers.learner import Learner, learner_class
from trainers.logprob import KernelChoice
from trainers.settings import LearnerSettings

LEARNER_CFG = LearnerSettings(lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=24,
                              mini_batches_per_step=2, epochs_per_step=1, old_logprob_source="learner", num_gpus=0,
                              strategy="deepspeed", deepspeed={"param_persistence_threshold": 0})
ALGO = AlgorithmConfig(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean",
                       kl_coef=0.1, kl_in="loss", kl_estimator="k3")
METRICS = ("loss/policy", "loss/kl", "loss/total", "loss/entropy", "loss/grad_norm")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("ds_model"))


def _new_learner(rank, world, port, model_dir, logprob=None):
    learner = learner_class("deepspeed")(model_dir, LEARNER_CFG, ALGO, temperature=0.8, rank=rank, world_size=world,
                                         master=("127.0.0.1", port))
    if logprob:  # a fused kernel, set directly: it reads the LM-head weight outside the head module's forward
        learner.kernels = KernelChoice(logprob=logprob)
    return learner


def _rank_main(rank, world, port, model_dir, out_dir, resume_from):
    torch.set_num_threads(1)
    learner = _new_learner(rank, world, port, model_dir)
    res = {"before": learner.compute_logprobs(random_samples()), "metrics": learner.train_step(random_samples())}
    blobs = {"weights": learner.export_weights()}
    learner.save(os.path.join(out_dir, "ck"))
    res["next_metrics"] = learner.train_step(random_samples(seed=1))  # continuing after the save
    blobs["next_weights"] = learner.export_weights()
    res["num_updates"] = learner.num_updates
    if resume_from:  # a fresh learner in the same ranks (with the fused chunked kernel) resumes another checkpoint
        resumed = _new_learner(rank, world, port, model_dir, logprob="chunked")
        resumed.load(resume_from)
        res["resumed_metrics"] = resumed.train_step(random_samples(seed=1))
        blobs["resumed_weights"] = resumed.export_weights()
        res["resumed_num_updates"] = resumed.num_updates
    if rank == 0:
        for key, blob in blobs.items():
            with open(os.path.join(out_dir, f"{key}.safetensors"), "wb") as f:
                f.write(blob)
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f)
    _leave_together()


def _leave_together():
    """Every rank waits for the others, then the group is torn down before the process exits: a rank that exits
    while another still runs gloo work was seen to abort ("terminate called without an active exception")."""
    from trainers import distributed as D

    D.barrier()
    D.destroy()


def _run(world, model_dir, out_dir, resume_from=None):
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_rank_main, args=(world, free_port(), model_dir, str(out_dir), resume_from), nprocs=world, join=True)
    with open(os.path.join(out_dir, "result.json")) as f:
        res = json.load(f)
    for key in ("weights", "next_weights", "resumed_weights"):
        path = os.path.join(out_dir, f"{key}.safetensors")
        if os.path.exists(path):
            with open(path, "rb") as f:
                res[key] = st_load(f.read())
    return res


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """The single strategy, then deepspeed on 1 rank, then on 2 ranks (which also resume the 1-rank checkpoint)."""
    root = tmp_path_factory.mktemp("ds_runs")
    single = Learner(model_dir, LEARNER_CFG.replace(strategy="single"), ALGO, temperature=0.8)
    ref = {"before": single.compute_logprobs(random_samples()), "metrics": single.train_step(random_samples()),
           "weights": st_load(single.export_weights())}
    ref["next_metrics"] = single.train_step(random_samples(seed=1))
    ref["next_weights"] = st_load(single.export_weights())
    w1 = _run(1, model_dir, root / "w1")
    w2 = _run(2, model_dir, root / "w2", resume_from=str(root / "w1" / "ck"))
    return {"single": ref, "w1": w1, "w2": w2, "root": root}


def _max_abs(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def _flat(rows):
    return [x for r in rows for x in r]


@pytest.mark.multiproc
def test_world_size_invariance(runs, model_dir):
    single = runs["single"]
    for name in ("w1", "w2"):
        res = runs[name]
        diffs = (max(abs(a - b) for a, b in zip(_flat(res["before"]), _flat(single["before"]))),
                 max(abs(res[s][k] - single[s][k]) for s in ("metrics", "next_metrics") for k in METRICS),
                 _max_abs(res["weights"], single["weights"]), _max_abs(res["next_weights"], single["next_weights"]))
        print("%s vs single, max abs diff: log-probs %.2e, metrics %.2e, weights %.2e (step 1) %.2e (step 2)"
              % (name, *diffs))
        assert max(abs(a - b) for a, b in zip(_flat(res["before"]), _flat(single["before"]))) < 1e-5
        for step in ("metrics", "next_metrics"):
            for key in METRICS:
                assert res[step][key] == pytest.approx(single[step][key], rel=1e-4, abs=1e-7), (name, step, key)
        # the update itself (lr 1e-3 moves weights by ~1e-3): the same within fp32 reduction-order noise
        assert _max_abs(res["weights"], single["weights"]) < 1e-5, name
        assert _max_abs(res["next_weights"], single["next_weights"]) < 1e-5, name
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        initial = st_load(f.read())
    moved = max(float((runs["w2"]["weights"][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4  # the step changed the weights, so the comparisons above are not vacuous


@pytest.mark.multiproc
def test_checkpoint_resume(runs, model_dir):
    """Save after one step, load, one more step == the step that continued without the checkpoint: the 1-rank
    checkpoint resumed on 2 ranks (with the fused chunked kernel), and the 2-rank one resumed by the single strategy
    (the optimizer state is saved whole and keyed by name, as Learner.save does)."""
    w1, w2 = runs["w1"], runs["w2"]
    assert w2["resumed_num_updates"] == w1["num_updates"] == 4
    resumed = {"next_metrics": w2["resumed_metrics"], "next_weights": w2["resumed_weights"]}
    single = Learner(model_dir, LEARNER_CFG.replace(strategy="single"), ALGO, temperature=0.8)
    single.load(str(runs["root"] / "w2" / "ck"))
    from_ds = {"next_metrics": single.train_step(random_samples(seed=1)), "next_weights": st_load(single.export_weights())}
    for name, got, want in (("2 ranks from a 1-rank checkpoint", resumed, w1), ("single from 2 ranks", from_ds, w2)):
        print("resumed, %s vs continuing, max abs diff: metrics %.2e, weights %.2e"
              % (name, max(abs(got["next_metrics"][k] - want["next_metrics"][k]) for k in METRICS),
                 _max_abs(got["next_weights"], want["next_weights"])))
        for key in METRICS:
            assert got["next_metrics"][key] == pytest.approx(want["next_metrics"][key], rel=1e-4, abs=1e-7), key
        assert _max_abs(got["next_weights"], want["next_weights"]) < 1e-5
    # not the first step again: the weights and the optimizer state were restored
    assert w2["resumed_metrics"]["loss/total"] != pytest.approx(w1["metrics"]["loss/total"], rel=1e-3)


def _bf16_rank_main(rank, world, port, model_dir, out_dir):
    """Two bf16 steps, save, a third step; then fresh learners resume the checkpoint (with and without its fp32
    master weights) and take the same third step."""
    import shutil

    from trainers import distributed as D

    torch.set_num_threads(1)

    def new():
        return learner_class("deepspeed")(model_dir, LEARNER_CFG, ALGO, temperature=0.8, dtype="bfloat16", rank=rank,
                                          world_size=world, master=("127.0.0.1", port))

    learner = new()
    learner.train_step(random_samples())
    learner.train_step(random_samples(seed=2))
    ck = os.path.join(out_dir, "ck")
    learner.save(ck)
    if rank == 0:  # the same checkpoint without the master copy (as another strategy would have written it)
        shutil.copytree(ck, ck + "_no_master")
        state = torch.load(os.path.join(ck, "learner_state.pt"), weights_only=False)
        assert set(state["master_weights"]) == {n for n, _ in learner._named_trainable()}
        assert all(v.dtype == torch.float32 for v in state["master_weights"].values())
        del state["master_weights"]
        torch.save(state, os.path.join(ck + "_no_master", "learner_state.pt"))
    D.barrier()
    blobs = {}
    learner.train_step(random_samples(seed=1))
    blobs["continued"] = learner.export_weights()
    for key, path in (("resumed", ck), ("resumed_no_master", ck + "_no_master")):
        resumed = new()
        resumed.load(path)
        resumed.train_step(random_samples(seed=1))
        blobs[key] = resumed.export_weights()
    if rank == 0:
        for key, blob in blobs.items():
            with open(os.path.join(out_dir, f"{key}.safetensors"), "wb") as f:
                f.write(blob)
    _leave_together()


@pytest.mark.multiproc
def test_bf16_resume_is_bit_exact_with_the_master_weights(model_dir, tmp_path):
    mp.spawn(_bf16_rank_main, args=(2, free_port(), model_dir, str(tmp_path)), nprocs=2, join=True)
    got = {}
    for key in ("continued", "resumed", "resumed_no_master"):
        with open(tmp_path / f"{key}.safetensors", "rb") as f:
            got[key] = st_load(f.read())
    assert all(v.dtype == torch.bfloat16 for v in got["continued"].values())
    assert _max_abs(got["resumed"], got["continued"]) == 0.0
    # Without the fp32 copy the masters restart from the bf16 weights: the next step lands elsewhere, so the
    # equality above is not vacuous.
    assert _max_abs(got["resumed_no_master"], got["continued"]) > 0.0


def test_learner_class_picks_deepspeed():
    from trainers.deepspeed_learner import DeepSpeedLearner

    assert learner_class("deepspeed") is DeepSpeedLearner
    assert learner_class("fsdp2") is Learner
