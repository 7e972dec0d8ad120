"""FSDP2 learner on gloo (CPU): 1 rank vs 2 ranks give the same log-probs, loss and parameter update.

Ranks run in spawned processes (the learner group's Ray actors are tested in tests/integration/test_placement.py);
here the numerics of sharding, the per-rank data split, padding passes and the summed gradient reduction.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load as st_load

from rl.algorithms import AlgorithmConfig
from tests.learner_fixtures import free_port, random_samples, save_tiny_qwen2
from trainers.distributed import assign_to_ranks
from trainers.learner import Learner
from trainers.settings import LearnerSettings

LEARNER_CFG = LearnerSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=24,
                              mini_batches_per_step=2, epochs_per_step=1, old_logprob_source="learner", num_gpus=0,
                              strategy="fsdp2")
ALGO = AlgorithmConfig(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean",
                       kl_coef=0.1, kl_in="loss", kl_estimator="k3")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("fsdp_model"))


def _rank_main(rank, world, port, model_dir, out_dir, cfg, resume_from):
    torch.set_num_threads(1)
    learner = Learner(model_dir, cfg, ALGO, temperature=0.8, rank=rank, world_size=world, master=("127.0.0.1", port))
    if resume_from:
        learner.load(resume_from)
    before = learner.compute_logprobs(random_samples())
    metrics = learner.train_step(random_samples())
    blob = learner.export_weights()
    learner.save(os.path.join(out_dir, "ck"))
    if rank == 0:
        with open(os.path.join(out_dir, "weights.safetensors"), "wb") as f:
            f.write(blob)
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"before": before, "metrics": metrics}, f)
    from trainers import distributed as D

    D.barrier()  # the ranks leave together and tear the group down before exiting (see test_deepspeed)
    D.destroy()


def _run(world, model_dir, out_dir, cfg=None, resume_from=None):
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_rank_main, args=(world, free_port(), model_dir, str(out_dir), cfg or LEARNER_CFG, resume_from),
             nprocs=world, join=True)
    with open(os.path.join(out_dir, "result.json")) as f:
        res = json.load(f)
    with open(os.path.join(out_dir, "weights.safetensors"), "rb") as f:
        res["weights"] = st_load(f.read())
    return res


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_runs")
    single = Learner(model_dir, LEARNER_CFG.replace(strategy="single"), ALGO, temperature=0.8)
    before = single.compute_logprobs(random_samples())
    metrics = single.train_step(random_samples())
    ref = {"before": before, "metrics": metrics, "weights": st_load(single.export_weights())}
    return ref, _run(1, model_dir, root / "w1"), _run(2, model_dir, root / "w2"), root


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)


def test_assign_to_ranks_balances_and_covers():
    parts = assign_to_ranks([10, 1, 1, 8, 3, 3], 2)
    assert sorted(i for p in parts for i in p) == list(range(6))
    loads = [sum([10, 1, 1, 8, 3, 3][i] for i in p) for p in parts]
    assert loads == [13, 13]
    assert assign_to_ranks([5], 3) == [[0], [], []]  # a rank may get nothing: it runs padding passes


@pytest.mark.multiproc
def test_world_size_invariance(runs, model_dir):
    single, w1, w2, _ = runs
    for res in (w1, w2):
        flat = lambda rows: [x for r in rows for x in r]  # noqa: E731
        assert max(abs(a - b) for a, b in zip(flat(res["before"]), flat(single["before"]))) < 1e-5
        for key in ("loss/policy", "loss/kl", "loss/total", "loss/entropy", "loss/grad_norm"):
            assert res["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-7), key
        assert set(res["weights"]) == set(single["weights"])
        # the update itself (lr 1e-3 moves weights by ~1e-3): the same within fp32 reduction-order noise
        delta = {k: res["weights"][k] - single["weights"][k] for k in single["weights"]}
        assert max(float(d.abs().max()) for d in delta.values()) < 1e-5
    initial = st_load(open(os.path.join(model_dir, "model.safetensors"), "rb").read())
    moved = max(float((w2["weights"][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4  # the step changed the weights, so the comparison above is not vacuous


@pytest.mark.multiproc
def test_checkpoint_across_world_sizes(runs, model_dir, tmp_path):
    """A 2-rank checkpoint resumes on 1 rank (fsdp2 and single) with the same next step as on 2 ranks."""
    _, _, w2, root = runs
    ck = str(root / "w2" / "ck")
    again2 = _run(2, model_dir, tmp_path / "r2", resume_from=ck)
    again1 = _run(1, model_dir, tmp_path / "r1", resume_from=ck)
    single = Learner(model_dir, LEARNER_CFG.replace(strategy="single"), ALGO, temperature=0.8)
    single.load(ck)
    m = single.train_step(random_samples())
    for res in (again1, {"metrics": m}):
        assert res["metrics"]["loss/total"] == pytest.approx(again2["metrics"]["loss/total"], rel=1e-4)
    assert again2["metrics"]["loss/total"] != pytest.approx(w2["metrics"]["loss/total"], rel=1e-3)
