"""``rl plan``: every recipe plans, the memory arithmetic matches a hand computation, broken configs name the fix."""

import json
from pathlib import Path

import pytest

from trainers.cli import main
from rl.config import load_config
from rl.plan import KNOWN_SHAPES, PlanError, parse_shape_spec, plan

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
GIB = 2**30
MIB = 2**20
EIGHT_GPU = str(ROOT / "configs" / "cluster_8gpu_qwen2.5_math_7b.yaml")


def run_plan(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_plans(recipe, capsys):
    rc, out, _ = run_plan(capsys, str(recipe), "--json")
    result = json.loads(out)
    assert rc == 0 and result["ok"], result["errors"]
    assert "Each step:" in result["batch"]["summary"]
    cfg = load_config(recipe)
    if cfg.learner.num_gpus == 0 and cfg.rollout.num_gpus_per_engine == 0:
        # the CPU recipes: no GPU estimate, host-RAM numbers instead
        assert result["placement"]["device"] == "cpu"
        assert result["memory"]["device"] == "cpu" and result["memory"]["host"]["per_learner_rank"] > 0
        assert any("per-GPU estimate does not apply" in n for n in result["notes"])


@pytest.mark.parametrize("name,gpus,extra", [
    ("cluster_1gpu_qwen2.5_math_1.5b.yaml", "1", []),
    ("cluster_8gpu_qwen2.5_math_7b.yaml", "8", []),
    ("cluster_4x8gpu_qwen2.5_math_7b.yaml", "32", ["--nodes", "4"]),
    ("cluster_8gpu_qwen2.5_math_7b_lora.yaml", "8", []),
])
def test_cluster_recipes_fit_their_cluster(name, gpus, extra, capsys):
    """The cluster recipes use their cluster exactly, with no error, no warning, and peaks under 80 GiB."""
    rc, out, _ = run_plan(capsys, str(ROOT / "configs" / name), "--cluster-gpus", gpus, *extra, "--json",
                          "--strict")
    result = json.loads(out)
    assert rc == 0 and not result["errors"] and not result["warnings"], (result["errors"], result["warnings"])
    assert result["placement"]["total_gpus"] == int(gpus)
    assert result["memory"]["peak"] < 80 * GIB


def test_eight_gpu_recipe_by_hand(capsys):
    """configs/cluster_8gpu_qwen2.5_math_7b.yaml: Qwen2.5-Math-7B (H=3584, L=28, 28 heads, 4 KV heads, d=128,
    I=18944, V=152064, untied), fp32 master weights with bf16 compute and bf16 engines, colocated 8 FSDP2 ranks + 8
    engines, micro-batches of 16384 tokens with activation checkpointing, gpu_memory_utilization 0.7 of 80 GiB,
    128 prompts x 8 samples."""
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "--cluster-gpus", "8", "--json")
    assert rc == 0
    r = json.loads(out)

    # Parameters. Per layer:
    #   q proj 3584*3584 + 3584 bias           = 12,848,640
    #   k, v proj 2 * (3584*512 + 512 bias)    =  3,671,040   (kv dim = 4 heads * 128)
    #   o proj 3584*3584                       = 12,845,056
    #   MLP 3 * 3584 * 18944                   = 203,685,888
    #   two RMSNorms 2 * 3584                  =      7,168
    #                                    total = 233,057,792
    per_layer = 12_848_640 + 3_671_040 + 12_845_056 + 203_685_888 + 7_168
    assert per_layer == 233_057_792
    # Outside the layers: embedding + untied LM head 2 * 152064*3584 = 1,089,994,752, final norm 3584.
    non_layer = 1_089_994_752 + 3_584
    # P = 28 * 233,057,792 + 1,089,998,336 = 7,615,616,512 (Qwen2.5-7B's published 7.61B)
    params = 28 * per_layer + non_layer
    assert params == 7_615_616_512
    assert r["model"]["params"] == params
    assert r["model"]["params_per_layer"] == per_layer and r["model"]["params_non_layer"] == non_layer

    # Sharded over 8 ranks, fp32 masters (learner.param_dtype, 4 bytes): 7,615,616,512 * 4 / 8 = 3,807,808,256 bytes
    # (3.55 GiB) of parameters, the same of gradients, twice that of AdamW state (exp_avg, exp_avg_sq in fp32):
    # 16 bytes per parameter, twice the pure-bf16 8 (1,903,904,128 each before); kl_coef 0: no reference.
    assert (r["model"]["master_dtype"], r["model"]["compute_dtype"], r["model"]["engine_dtype"]) == (
        "float32", "bfloat16", "bfloat16")
    learner = r["memory"]["learner"]
    assert (learner["param_bytes"], learner["compute_bytes"]) == (4, 2)
    assert learner["parameters"] == 3_807_808_256
    assert learner["gradients"] == 3_807_808_256
    assert learner["optimizer"] == 7_615_616_512
    assert learner["reference"] == 0

    # Gathered: root unit (non-layer params) + its gradient, two layers + one layer's gradient, in the bf16 compute
    # dtype (FSDP2's MixedPrecisionPolicy): 2 * (2 * 1,089,998,336 + 3 * 233,057,792) = 5,758,340,096
    assert learner["gathered"] == 5_758_340_096

    # Activations with checkpointing, T = 16384 tokens:
    #   A = 2*(2*3584 + 2*512 + 4*18944) + 2*3584*(2*2 + 4) = 167,936 + 57,344 = 225,280 bytes per token and layer
    #   T * (28 * 3584 * 2 + A) = 16384 * (200,704 + 225,280) = 6,979,321,856
    assert learner["activation_bytes_per_token_per_layer"] == 225_280
    assert learner["activations"] == 6_979_321_856

    # Log-prob peak, triton on CUDA (auto): 256 MiB of buffers + fp32 LM-head gradient 152064*3584*4
    #   = 268,435,456 + 2,179,989,504 = 2,448,424,960
    assert learner["logprob_kernel"] == "triton"
    assert learner["logprob"] == 2_448_424_960

    # vLLM engine, TP 1, bf16 (rollout.dtype None: model.dtype): weights 7,615,616,512 * 2 = 15,231,233,024; budget
    # 0.7 * 80 GiB = 56 GiB
    # = 60,129,542,144; KV = 60,129,542,144 - 15,231,233,024 - 2 GiB (2,147,483,648) = 42,750,825,472.
    # KV per token: 2 (K and V) * 28 layers * 4 KV heads * 128 * 2 bytes = 57,344 -> 745,515 tokens (floor).
    engine = r["memory"]["engine"]
    assert engine["dtype"] == "bfloat16"
    assert engine["weights"] == 15_231_233_024
    assert engine["budget"] == 60_129_542_144
    assert engine["kv_cache"] == 42_750_825_472
    assert engine["kv_bytes_per_token"] == 57_344
    assert engine["kv_tokens"] == 42_750_825_472 // 57_344 == 745_515
    # A round: 128 prompts * 8 samples / 8 engines = 128 sequences * 4096 tokens = 524,288 tokens per engine.
    assert engine["concurrent_need_tokens"] == 524_288

    # Colocated, sleep level 2: max(train peak + 0.5 GiB asleep engine, resident + 56 GiB). Train peak: parameters,
    # gradients and AdamW (3,807,808,256 * 4 = 15,231,233,024) + gathered + activations + log-prob + context
    # = 30,954,190,848 (28.83 GiB; 21.74 GiB in pure bf16). Resident: the gradients are freed after each update,
    # so parameters + AdamW 3,807,808,256 * 3 = 11,423,424,768 + 0.5 GiB = 11,960,295,680 (11.14 GiB).
    train = 3_807_808_256 * 4 + 5_758_340_096 + 6_979_321_856 + 2_448_424_960 + GIB // 2
    resident = 3_807_808_256 * 3 + GIB // 2
    assert (train, resident) == (30_954_190_848, 11_960_295_680)
    assert learner["train_peak"] == train and learner["resident"] == resident
    # 11,960,295,680 + 60,129,542,144 = 72,089,837,824 (67.14 GiB) while generating is the peak
    assert r["memory"]["peak"] == max(train + GIB // 2, resident + 60_129_542_144) == 72_089_837_824

    # Batch: 1024 responses, 4 mini-batches of 256 (32 groups), 32 responses per rank.
    b = r["batch"]
    assert (b["samples_per_step"], b["samples_per_mini_batch"], b["groups_per_mini_batch"]) == (1024, 256, 32)
    assert b["samples_per_rank_per_mini_batch"] == 32
    assert "128 prompts x 8 samples = 1024 responses" in b["summary"]
    assert "each of 8 learner ranks gets 32 responses per mini-batch" in b["summary"]


def test_naive_logits_peak(capsys):
    # naive: 16384 tokens * 152064 vocab * (2 bytes bf16 logits + 4 fp32 copy + 4 fp32 log-softmax) = 24,914,165,760
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "learner.kernels.logprob=naive", "--json")
    assert rc == 0
    learner = json.loads(out)["memory"]["learner"]
    assert learner["logprob_kernel"] == "naive" and learner["logprob"] == 24_914_165_760


def test_colocated_needs_equal_engines_and_ranks(capsys):
    rc, _, err = run_plan(capsys, EIGHT_GPU, "rollout.num_engines=4")
    assert rc == 1
    assert "rollout.num_engines=4 must equal learner.num_ranks=8" in err


def test_more_gpus_than_the_cluster(capsys):
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "--cluster-gpus", "4")
    assert rc == 1
    assert "needs 8 GPUs" in out and "--cluster-gpus=4" in out and "lower learner.num_ranks" in out
    # disaggregated 16 + 16 on 24 GPUs: the colocated alternative is named
    rc, out, _ = run_plan(capsys, str(ROOT / "configs" / "cluster_4x8gpu_qwen2.5_math_7b.yaml"), "--cluster-gpus", "24",
                          "--json")
    errors = json.loads(out)["errors"]
    assert rc == 1 and any("placement.mode=colocated (needs 16)" in e["message"] for e in errors)


def test_mini_batch_smaller_than_ranks(capsys):
    # 128 prompts x 4 samples / 128 mini-batches = 4 responses per mini-batch for 8 ranks
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "rollout.num_samples_per_prompt=4", "learner.mini_batches_per_step=128",
                          "--json")
    r = json.loads(out)
    assert rc == 1 and not r["ok"]
    (e,) = r["errors"]
    assert e["key"] == "learner.num_ranks"
    assert "cannot be split over learner.num_ranks=8" in e["message"]
    assert "Lower learner.num_ranks to <= 4" in e["message"]


def test_uneven_split_warns_and_strict_fails(capsys):
    # 128 x 5 / 64 = 10 responses per mini-batch over 8 ranks: 1 or 2 each
    args = (EIGHT_GPU, "rollout.num_samples_per_prompt=5", "learner.mini_batches_per_step=64")
    rc, out, _ = run_plan(capsys, *args)
    assert rc == 0 and "splits unevenly over 8 ranks" in out
    rc, _, _ = run_plan(capsys, *args, "--strict")
    assert rc == 1


def test_tensor_parallel_must_match_engine_gpus(capsys):
    rc, out, _ = run_plan(capsys, str(ROOT / "configs" / "cluster_4x8gpu_qwen2.5_math_7b.yaml"),
                          "rollout.tensor_parallel_size=2", "--json")
    (e,) = json.loads(out)["errors"]
    assert rc == 1 and e["key"] == "rollout.tensor_parallel_size"
    assert "set rollout.tensor_parallel_size=1" in e["message"]


def test_memory_over_the_gpu_names_the_knobs(capsys):
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "learner.activation_checkpointing=false", "--json")
    r = json.loads(out)
    (w,) = [w for w in r["warnings"] if w["key"] == "memory"]
    assert rc == 0  # a warning, not an error
    assert "exceeds --gpu-memory-gib=80" in w["message"]
    assert "learner.activation_checkpointing=true" in w["message"] and "learner.micro_batch_tokens" in w["message"]


def test_text_output_and_config_errors(capsys):
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "--cluster-gpus", "8")
    assert rc == 0 and "memory estimate" in out and "PEAK, colocated GPU" in out and out.rstrip().endswith("plan: OK")
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "rollout.temperatur=1", "--json")
    r = json.loads(out)
    assert rc == 1 and "did you mean 'rollout.temperature'" in r["errors"][0]["message"]


def test_model_shapes(tmp_path):
    assert parse_shape_spec("qwen2.5-math-1.5b") is KNOWN_SHAPES["qwen2.5-math-1.5b"]
    # Qwen2.5-1.5B: 28 * 46,797,824 + 151936*1536 (tied) + 1536 = 1,543,714,304 (published: 1.54B)
    assert KNOWN_SHAPES["qwen2.5-1.5b"].num_params() == 1_543_714_304
    spec = parse_shape_spec("hidden=1536,layers=28,heads=12,kv_heads=2,intermediate=8960,vocab=151936,tie=true")
    assert spec.num_params() == 1_543_714_304
    with pytest.raises(PlanError, match="not a known model"):
        parse_shape_spec("llama-9000")
    # a local checkpoint directory: its config.json is read
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": False}))
    cfg = load_config(EIGHT_GPU, [f"model.path={tmp_path}"])
    r = plan(cfg, cluster_gpus=8)
    assert r["model"]["source"].endswith("config.json") and r["model"]["params"] == 1_543_714_304 + 151936 * 1536
    # an unknown model off this machine: a warning and no memory estimate, unless --model-shape is given
    cfg = load_config(EIGHT_GPU, ["model.path=/nonexistent/my-model"])
    r = plan(cfg)
    assert r["ok"] and r["memory"] is None and r["warnings"][0]["key"] == "model.path"
    assert plan(cfg, model_shape="Qwen2.5-Math-7B")["memory"] is not None


def test_deepspeed_zero3_keeps_fp32_master_and_gradients(capsys):
    # P = 7,615,616,512 (see above), bf16 compute, 8 ranks: the module in bf16, parameters 2P/8 = 1,903,904,128;
    # ZeRO-3 in bf16 keeps fp32 gradient partitions 4P/8 = 3,807,808,256 and fp32 master + two fp32 Adam moments
    # 12P/8 = 11,423,424,768 (learner.param_dtype does not change that). Its gradient partitions are one persistent
    # buffer, so they stay in the resident state: 1,903,904,128 + 3,807,808,256 + 11,423,424,768 + 0.5 GiB.
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "learner.strategy=deepspeed", "--json")
    assert rc == 0
    r = json.loads(out)
    learner = r["memory"]["learner"]
    assert r["model"]["master_dtype"] == "float32" and not r["warnings"]
    assert (learner["parameters"], learner["gradients"], learner["optimizer"]) == (
        1_903_904_128, 3_807_808_256, 11_423_424_768)
    assert learner["resident"] == 1_903_904_128 + 3_807_808_256 + 11_423_424_768 + GIB // 2
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "learner.strategy=deepspeed", "learner.deepspeed.offload_optimizer=true",
                          "--json")
    learner = json.loads(out)["memory"]["learner"]
    assert learner["gradients"] == 0 and learner["optimizer"] == 0 and learner["parameters"] == 1_903_904_128
    assert learner["offloaded_to_host"] == 3_807_808_256 + 11_423_424_768


def test_drafter_replica_by_hand(capsys):
    """The 8-GPU recipe with a drafter trained online: every rank holds a replica. Qwen2.5-Math-7B: one layer
    3584*3584*2 (q, o) + 2*3584*512 (k, v) + 3584+1024 (biases) + 3*3584*18944 (MLP) + 2*3584 (norms) = 233,057,792;
    P_d = 2*3584^2 (fc) + that = 258,747,904; states 16*P_d + 2*152064*3584*2 (bf16 copies of the embedding and
    the LM head) = 4,139,966,464 + 2,179,989,504.
    Step: ceil(16/8) = 2 sequences x 4096 tokens x (4*(2*3584 + 2*512 + 4*18944) + 40*3584 = 479,232 bytes) plus
    4 x 128 MiB of token-loss chunks. Buffer: ceil(200,000/8) = 25,000 tokens x 3584 x 2 bytes (bf16) in host RAM."""
    opts = ["--cluster-gpus", "8", "--json"]
    rc, out, _ = run_plan(capsys, EIGHT_GPU, *opts)
    without = json.loads(out)["memory"]
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "drafter.mode=fixed", "drafter.publish_every=1", *opts)
    assert rc == 0
    mem = json.loads(out)["memory"]
    lr = mem["learner"]
    assert lr["drafter"] == 4_139_966_464 + 2_179_989_504
    assert lr["drafter_work"] == 2 * 4096 * 479_232 + 4 * 128 * MIB
    assert lr["drafter_buffer_host"] == 25_000 * 3584 * 2
    assert lr["resident"] == without["learner"]["resident"] + lr["drafter"]
    assert lr["train_peak"] == without["learner"]["train_peak"] + lr["drafter"]
    assert lr["generating"] == lr["resident"] + lr["drafter_work"]
    # colocated: the drafter's step runs while the engines are awake
    assert mem["colocated_phases"]["generating"] == lr["generating"] + mem["engine"]["awake"]
    assert mem["host"]["per_learner_rank_drafter_buffer"] == lr["drafter_buffer_host"]
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "drafter.mode=fixed", "drafter.train=false",
                          "drafter.init_path=/ckpt/drafter", "placement.engine_sleep_level=1", *opts)
    assert json.loads(out)["memory"]["learner"]["drafter"] == 0  # served as it is: no replica on the learner


def test_pure_bf16_adamw_warns_and_mixed_dtypes_are_counted(capsys):
    """learner.param_dtype=bfloat16 (the recipes' old pure-bf16 setting): a warning naming the fix, and the states of
    the 8-GPU recipe back at 2 bytes: 7,615,616,512 * 2 / 8 = 1,903,904,128 each for parameters and gradients,
    twice that for AdamW (8 bytes per parameter against 16 with fp32 masters)."""
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "learner.param_dtype=bfloat16", "--cluster-gpus", "8", "--json")
    r = json.loads(out)
    assert rc == 0 and r["model"]["master_dtype"] == "bfloat16"
    (w,) = r["warnings"]
    assert w["key"] == "learner.param_dtype" and "learner.param_dtype=float32" in w["message"]
    lr = r["memory"]["learner"]
    assert (lr["parameters"], lr["gradients"], lr["optimizer"]) == (1_903_904_128, 1_903_904_128, 3_807_808_256)
    # the same with --strict fails (the cluster recipes themselves plan with no warning: test above)
    rc, _, _ = run_plan(capsys, EIGHT_GPU, "learner.param_dtype=bfloat16", "--strict")
    assert rc == 1
    # a 16-bit param_dtype that differs from the compute dtype is refused (as the learner does)
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "learner.param_dtype=float16", "--json")
    r = json.loads(out)
    assert rc == 1 and r["errors"][0]["key"] == "learner.param_dtype"


def test_engine_dtype_and_single_strategy_compute_copies(capsys):
    """rollout.dtype=float32 engines: weights 7,615,616,512 * 4 = 30,462,466,048 bytes. The single strategy with fp32
    masters and bf16 compute (Qwen2.5-Math-1.5B recipe, P = 1,543,714,304, tied) keeps autocast's bf16 copy of the
    weights, P * 2 = 3,087,428,608, and its reference policy (kl_coef 0.001 here) in bf16 too."""
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "rollout.dtype=float32", "--json")
    r = json.loads(out)
    assert r["model"]["engine_dtype"] == "float32" and r["memory"]["engine"]["weights"] == 30_462_466_048
    rc, out, _ = run_plan(capsys, str(ROOT / "configs" / "qwen2.5_math_1.5b_grpo.yaml"), "algorithm.kl_coef=0.001",
                          "--json")
    lr = json.loads(out)["memory"]["learner"]
    assert lr["strategy"] == "single" and (lr["param_bytes"], lr["compute_bytes"]) == (4, 2)
    assert lr["parameters"] == 1_543_714_304 * 4 and lr["optimizer"] == 1_543_714_304 * 8
    assert lr["gathered"] == 3_087_428_608 and lr["reference"] == 3_087_428_608
    # loads the fp32 model and a bf16 reference: P * 4 + P * 2 + 0.5 GiB context
    assert lr["load"] == 1_543_714_304 * 6 + GIB // 2
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "--cluster-gpus", "8")
    assert "dtypes: learner float32 master weights and AdamW state, bfloat16 compute; engines bfloat16" in out
    assert "engine (bfloat16 weights), per GPU" in out


@pytest.mark.parametrize("ranks,engines,nodes,ok", [
    (2, 2, 2, True),    # each group's two bundles on two nodes: fine (the old check counted 4 bundles together)
    (3, 2, 2, False),   # the learner group's three bundles need three nodes
    (2, 3, 2, False),
])
def test_strict_spread_counts_each_group_on_its_own(ranks, engines, nodes, ok, capsys):
    rc, out, _ = run_plan(capsys, EIGHT_GPU, "placement.mode=disaggregated", "placement.strategy=STRICT_SPREAD",
                          f"learner.num_ranks={ranks}", f"rollout.num_engines={engines}",
                          "--cluster-gpus", "16", "--nodes", str(nodes), "--json")
    errors = [e for e in json.loads(out)["errors"] if "STRICT_SPREAD" in e["message"]]
    assert (not errors) == ok, errors
    if not ok:
        group = "learner" if ranks > nodes else "engine"
        assert f"the {group} group's {max(ranks, engines)} bundles on its own node, but there are {nodes}" in \
            errors[0]["message"]


def test_lora_recipe_by_hand(capsys):
    """configs/cluster_8gpu_qwen2.5_math_7b_lora.yaml: rank 64 on the 7 projections of Qwen2.5-Math-7B's 28
    layers, r * (in + out) each: q 3584+3584, k 3584+512, v 3584+512, o 3584+3584, gate / up 3584+18944,
    down 18944+3584 = 90112 per layer -> 64 * 90112 * 28 = 161,480,704 adapter parameters. The frozen base is
    held in bf16 (no master copy), the adapters, their gradients and AdamW moments in fp32."""
    rc, out, _ = run_plan(capsys, str(ROOT / "configs" / "cluster_8gpu_qwen2.5_math_7b_lora.yaml"),
                          "--cluster-gpus", "8", "--json")
    assert rc == 0
    lr = json.loads(out)["memory"]["learner"]
    adapter = 64 * 90112 * 28
    assert lr["lora_params"] == adapter == 161_480_704
    base = KNOWN_SHAPES["qwen2.5-math-7b"].num_params()
    assert lr["parameters"] == base * 2 + adapter * 4
    assert lr["gradients"] == adapter * 4 and lr["optimizer"] == 2 * adapter * 4
    assert lr["gathered"] == adapter * 2  # autocast's bf16 copies of the fp32 adapters only
    # the same run without LoRA would hold fp32 masters, gradients and AdamW state for all 7.6B parameters
    rc, out, _ = run_plan(capsys, str(ROOT / "configs" / "cluster_8gpu_qwen2.5_math_7b_lora.yaml"), "model.lora=null",
                          "--cluster-gpus", "8", "--json")
    full = json.loads(out)["memory"]["learner"]
    assert full["lora_params"] == 0 and full["optimizer"] == 2 * base * 4 and full["peak"] > 80 * GIB


def test_lora_engine_slots_and_sharded_learners_by_hand(capsys):
    """The engines' LoRA slots: vLLM holds max_loras (1) adapters of max_lora_rank (64 here) on all 7 projections
    in bf16: 64 * 90112 * 28 * 2 bytes = 0.30 GiB, taken from the KV cache. Sharded over 4 FSDP2 ranks: the bf16
    base, the fp32 adapters, their gradients and AdamW moments each a quarter; under ZeRO-3 in bf16 the adapters
    are held in bf16 with fp32 gradient partitions, masters and moments."""
    cfg = str(ROOT / "configs" / "cluster_8gpu_qwen2.5_math_7b_lora.yaml")
    rc, out, _ = run_plan(capsys, cfg, "--cluster-gpus", "8", "--json")
    mem = json.loads(out)["memory"]
    slots = 64 * 90112 * 28 * 2
    assert mem["engine"]["lora_slots"] == slots and round(slots / GIB, 2) == 0.30
    rc, out, _ = run_plan(capsys, cfg, "model.lora=null", "--cluster-gpus", "8", "--json")
    plain = json.loads(out)["memory"]["engine"]
    assert plain["lora_slots"] == 0 and plain["kv_cache"] - mem["engine"]["kv_cache"] == slots
    # a rank-12 adapter on two projections still gets rank-16 slots on all seven
    rc, out, _ = run_plan(capsys, cfg, "model.lora={rank: 12, alpha: 24, target_modules: [q_proj, v_proj]}",
                          "--cluster-gpus", "8", "--json")
    assert json.loads(out)["memory"]["engine"]["lora_slots"] == 16 * 90112 * 28 * 2
    base = KNOWN_SHAPES["qwen2.5-math-7b"].num_params()
    adapter = 64 * 90112 * 28
    for strategy in ("fsdp2", "deepspeed"):
        rc, out, _ = run_plan(capsys, cfg, f"learner.strategy={strategy}", "learner.num_ranks=4", "learner.num_gpus=1",
                              "rollout.num_engines=4", "--cluster-gpus", "8", "--json")
        assert rc == 0, out
        lr = json.loads(out)["memory"]["learner"]
        q = lambda x: -(-x // 4)  # noqa: E731 - ceil of a quarter
        if strategy == "fsdp2":
            assert lr["parameters"] == q(base * 2) + q(adapter * 4)
            assert lr["gradients"] == q(adapter * 4) and lr["optimizer"] == 2 * q(adapter * 4)
        else:
            assert lr["parameters"] == q(base * 2) + q(adapter * 2)
            assert lr["gradients"] == q(adapter * 4) and lr["optimizer"] == q(3 * adapter * 4)


def test_lora_targets_plan_does_not_know(capsys):
    rc, out, _ = run_plan(capsys, str(ROOT / "configs" / "cluster_8gpu_qwen2.5_math_7b_lora.yaml"),
                          "model.lora.target_modules=[q_proj,qkv_proj]", "--cluster-gpus", "8", "--json")
    result = json.loads(out)
    assert rc == 1 and [e["key"] for e in result["errors"]] == ["model.lora.target_modules"]
    assert "['qkv_proj']" in result["errors"][0]["message"]
