"""The DeepSpeed dict, precision choice, LR schedule and `llmos plan`: pure functions, hand-checked."""

import math

import pytest

from llmos_ray.config import ConfigError, load_config
from llmos_ray.train.deepspeed import accumulation_steps, choose_precision, deepspeed_config, lr_at
from llmos_ray.train.plan import plan, plan_numbers


def cfg(*overrides):
    return load_config(None, list(overrides))


def test_zero2_cpu_dict():
    c = cfg("train.micro_batch_size=4", "train.global_batch_size=32", "train.num_workers=2", "deepspeed.zero_stage=2",
            "train.grad_clip=0.5")
    d = deepspeed_config(c, world_size=2, device="cpu", precision="fp32")
    assert d["train_micro_batch_size_per_gpu"] == 4
    assert d["gradient_accumulation_steps"] == 4
    assert d["train_batch_size"] == 32
    assert d["gradient_clipping"] == 0.5
    assert d["zero_optimization"]["stage"] == 2 and d["zero_optimization"]["reduce_scatter"] is True
    assert "optimizer" not in d  # CPU: torch AdamW handed to DeepSpeed
    assert "bf16" not in d and "fp16" not in d


def test_zero3_gpu_bf16_offload_dict():
    c = cfg("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
            "train.lr=2e-4", "train.activation_checkpointing=true")
    d = deepspeed_config(c, world_size=8, device="cuda", precision="bf16")
    z = d["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"] is True
    assert d["bf16"] == {"enabled": True}
    assert d["optimizer"]["type"] == "AdamW" and d["optimizer"]["params"]["lr"] == 2e-4
    assert "activation_checkpointing" in d


def test_fp16_has_dynamic_loss_scaling_and_extra_merges():
    c = cfg("deepspeed.extra={zero_optimization: {overlap_comm: false}, flops_profiler: {enabled: true}}")
    d = deepspeed_config(c, world_size=2, device="cuda", precision="fp16")
    assert d["fp16"]["enabled"] and d["fp16"]["loss_scale"] == 0  # 0 = dynamic
    assert d["zero_optimization"]["overlap_comm"] is False and d["zero_optimization"]["stage"] == 2
    assert d["flops_profiler"] == {"enabled": True}


def test_load_universal_only_when_asked():
    c = cfg("deepspeed.zero_stage=2")
    assert "checkpoint" not in deepspeed_config(c, 2, "cpu", "fp32")
    assert deepspeed_config(c, 1, "cpu", "fp32", load_universal=True)["checkpoint"] == {"load_universal": True}


def test_offload_needs_zero():
    with pytest.raises(ConfigError, match="offload_optimizer needs"):
        deepspeed_config(cfg("deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"), 2, "cuda", "bf16")


@pytest.mark.parametrize("requested,device,bf16,expected", [
    ("auto", "cpu", False, "fp32"), ("auto", "cuda", True, "bf16"), ("auto", "cuda", False, "fp16"),
    ("fp32", "cuda", True, "fp32"), ("bf16", "cpu", False, "bf16"),
])
def test_precision_choice(requested, device, bf16, expected):
    assert choose_precision(requested, device, bf16) == expected


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        choose_precision("fp16", "cpu")


def test_accumulation_steps():
    assert accumulation_steps(cfg("train.micro_batch_size=8"), 2) == 1
    four = cfg("train.micro_batch_size=2", "train.global_batch_size=16", "train.num_workers=2")
    assert accumulation_steps(four, 2) == 4


def test_elastic_training_keeps_the_global_batch_on_fewer_workers():
    from llmos_ray.train.trainer import scaling_workers

    elastic = cfg("train.num_workers=2", "train.min_workers=1", "train.micro_batch_size=2")
    assert scaling_workers(elastic) == (1, 2) and scaling_workers(cfg("train.num_workers=4")) == 4
    assert [accumulation_steps(elastic, w) for w in (2, 1)] == [1, 2]  # 4 rows per step either way
    wide = cfg("train.num_workers=4", "train.min_workers=2", "train.micro_batch_size=2", "train.global_batch_size=24")
    assert [accumulation_steps(wide, w) for w in (4, 3, 2)] == [3, 4, 6]
    with pytest.raises(ConfigError, match="not for 3 workers"):
        cfg("train.num_workers=4", "train.min_workers=2", "train.micro_batch_size=2", "train.global_batch_size=16")
    with pytest.raises(ConfigError, match="train.min_workers must be in"):
        cfg("train.num_workers=2", "train.min_workers=3")


def test_warmup_then_cosine():
    c = cfg("train.max_steps=110", "train.warmup_steps=10", "train.min_lr_ratio=0.1")
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, c) == pytest.approx(0.1)
    assert lr_at(500, c) == pytest.approx(0.1)


def test_plan_numbers_by_hand():
    c = cfg("model.family=llama", "model.size=7b", "train.num_workers=8", "data.seq_len=4096", "data.vocab_size=32000",
            "train.micro_batch_size=2", "train.global_batch_size=64")
    p = plan_numbers(c)
    psi = p["params"]
    assert psi == 6_738_415_616  # Llama-2-7B's published parameter count (32000 vocab, untied head)
    assert p["zero"][3]["total"] == pytest.approx(16 * psi / 8)
    assert p["zero"][1]["total"] == pytest.approx(4 * psi + 12 * psi / 8)
    assert p["tokens_per_step"] == 64 * 4096
    assert p["flops_per_step"] == p["flops_per_token"] * 64 * 4096
    text = plan(c)
    assert "6,738.4M parameters" in text and "<- configured" in text


def test_buckets_sized_to_the_model_and_extra_still_wins():
    c = cfg("deepspeed.zero_stage=3")
    z = deepspeed_config(c, 2, "cuda", "bf16", hidden_size=256)["zero_optimization"]
    assert z["reduce_bucket_size"] == 256**2 and z["allgather_bucket_size"] == 256**2
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 256**2) and z["stage3_param_persistence_threshold"] == 2560
    big = deepspeed_config(c, 2, "cuda", "bf16", hidden_size=8192)["zero_optimization"]
    assert big["reduce_bucket_size"] == 5e7  # capped
    # On CPU one bucket holds the whole trainable model (each bucket is a blocking gloo round trip), capped too.
    small_cpu = deepspeed_config(c, 2, "cpu", "fp32", hidden_size=256, trainable_params=5_230_001)["zero_optimization"]
    whole = 5_230_080  # the trainable parameters, rounded up to a multiple of 512 (DeepSpeed asserts even buckets)
    assert small_cpu["reduce_bucket_size"] == whole and small_cpu["allgather_bucket_size"] == whole
    assert small_cpu["stage3_prefetch_bucket_size"] == int(0.9 * whole)
    assert deepspeed_config(c, 2, "cpu", "fp32", hidden_size=256, trainable_params=1000)["zero_optimization"][
        "reduce_bucket_size"] == 256**2  # never below hidden²
    assert deepspeed_config(c, 2, "cpu", "fp32", hidden_size=768, trainable_params=124_000_000)["zero_optimization"][
        "reduce_bucket_size"] == 5e7
    c2 = cfg("deepspeed.zero_stage=3", "deepspeed.extra={zero_optimization: {reduce_bucket_size: 123}}")
    assert deepspeed_config(c2, 2, "cuda", "bf16", hidden_size=256)["zero_optimization"]["reduce_bucket_size"] == 123

