"""Mixed precision in the learner: fp32 master weights and AdamW state, bf16 compute, bf16 weights for the engines.

One step at lr 1e-6 on a tiny random Qwen2 (CPU, bf16 autocast under ``single``, FSDP2's MixedPrecisionPolicy on
one gloo rank). A weight of magnitude ~0.02 has a bf16 spacing of 2^-13 ~ 1.2e-4 near it, so an AdamW step of
~1e-6 is far below half of it: stepped in bf16 the weight does not move; an fp32 master moves (its spacing there
is ~1.9e-9).
"""

import pytest
import torch
from safetensors.torch import load as st_load

from rl.algorithms import AlgorithmConfig
from tests.learner_fixtures import free_port, random_samples, save_tiny_qwen2
from trainers import distributed as D
from trainers.learner import Learner
from trainers.settings import LearnerSettings

LR = 1e-6
CFG = LearnerSettings(lr=LR, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_tokens=4096,
                      mini_batches_per_step=1, epochs_per_step=1, old_logprob_source="learner", num_gpus=0)
ALGO = AlgorithmConfig(advantage_estimator="grpo", policy_loss="ppo_clip", loss_agg_mode="token-mean")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("mp_model"))


def _learner(model_dir, strategy: str, param_dtype: str, compute_dtype: str, export_dtype: str | None = None):
    cfg = CFG.replace(strategy=strategy, param_dtype=param_dtype)
    kw = dict(rank=0, world_size=1, master=("127.0.0.1", free_port())) if strategy == "fsdp2" else {}
    return Learner(model_dir, cfg, ALGO, temperature=1.0, dtype=compute_dtype, export_dtype=export_dtype, **kw)


def _params(learner) -> dict[str, torch.Tensor]:
    return {n: D.full_tensor(p.detach()).clone() for n, p in learner.model.named_parameters()}


def _one_step(model_dir, strategy: str, param_dtype: str, compute_dtype: str) -> dict:
    """Share of the weights one train_step changes, its grad norm, the dtypes held, and the log-probs before."""
    learner = _learner(model_dir, strategy, param_dtype, compute_dtype)
    try:
        logp = learner.compute_logprobs(random_samples())
        before = _params(learner)
        metrics = learner.train_step(random_samples())
        after = _params(learner)
        changed = sum(int((after[n] != before[n]).sum()) for n in before)
        total = sum(t.numel() for t in before.values())
        states = {v.dtype for s in learner.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
                  and v.dim() > 0}
        return dict(changed=changed / total, grad_norm=metrics["loss/grad_norm"], logp=logp,
                    param_dtypes={t.dtype for t in after.values()}, state_dtypes=states)
    finally:
        D.destroy()


@pytest.mark.parametrize("strategy", ["single", "fsdp2"])
def test_fp32_masters_with_bf16_compute_keep_small_updates(model_dir, strategy):
    full = _one_step(model_dir, strategy, "float32", "float32")
    mixed = _one_step(model_dir, strategy, "float32", "bfloat16")
    pure = _one_step(model_dir, strategy, "bfloat16", "bfloat16")
    print(f"{strategy}: weights changed by one step at lr {LR:g}: fp32 {full['changed']:.2%}, fp32 masters + bf16 "
          f"compute {mixed['changed']:.2%}, pure bf16 {pure['changed']:.2%}; grad norms {full['grad_norm']:.4f} "
          f"{mixed['grad_norm']:.4f} {pure['grad_norm']:.4f}")
    assert mixed["changed"] > 0.90
    assert pure["changed"] < 0.10  # the old recipes' setting: AdamW on bf16 weights rounds the update away
    assert full["changed"] > 0.90
    # the masters and AdamW moments are fp32; pure bf16 holds both in bf16
    assert mixed["param_dtypes"] == mixed["state_dtypes"] == {torch.float32}
    assert pure["param_dtypes"] == pure["state_dtypes"] == {torch.bfloat16}
    # the mixed learner really computes in bf16: its log-probs differ from the fp32 ones by far more than fp32
    # rounding (~1e-6), and the gradient is the same one up to bf16 noise
    diff = max(abs(a - b) for ra, rb in zip(mixed["logp"], full["logp"]) for a, b in zip(ra, rb))
    assert 1e-4 < diff < 0.1
    assert mixed["grad_norm"] == pytest.approx(full["grad_norm"], rel=0.02)


@pytest.mark.parametrize("strategy", ["single", "fsdp2"])
def test_export_casts_fp32_masters_to_the_engine_dtype(model_dir, strategy):
    learner = _learner(model_dir, strategy, "float32", "bfloat16", export_dtype="bfloat16")
    try:
        masters = _params(learner)
        sizes = dict(learner._weight_sizes())
        learner.begin_weight_export(0)
        exported = st_load(learner.next_weight_bucket(0))
    finally:
        D.destroy()
    assert {v.dtype for v in masters.values()} == {torch.float32}
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    for name, master in masters.items():  # the round-to-nearest bf16 of each master, nothing else
        assert torch.equal(exported[name], master.to(torch.bfloat16)), name
        assert sizes[name] == master.numel() * 2  # the buckets are planned in the engines' bytes
    # export_dtype defaults to the compute dtype; fp32 engines get the masters as they are
    learner = _learner(model_dir, "single", "float32", "bfloat16", export_dtype="float32")
    exported = st_load(learner.export_weights())
    assert all(torch.equal(exported[n], m) for n, m in masters.items())
    assert _learner(model_dir, "single", "float32", "bfloat16").export_dtype == torch.bfloat16


def test_sixteen_bit_params_need_the_same_compute_dtype(model_dir):
    with pytest.raises(ValueError, match="learner.param_dtype=bfloat16 with model.dtype=float32"):
        _learner(model_dir, "single", "bfloat16", "float32")
    learner = _learner(model_dir, "single", "bfloat16", "bfloat16")  # pure bf16: no master copy
    assert (learner.param_dtype, learner.compute_dtype) == (torch.bfloat16, torch.bfloat16)
    assert next(learner.model.parameters()).dtype == torch.bfloat16
