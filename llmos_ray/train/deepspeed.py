"""The DeepSpeed config dict, built by pure functions of our Config (tested without starting anything)."""

from __future__ import annotations

import copy
import math
from typing import Any

from llmos_ray.config import Config
from llmos_ray.errors import ConfigError


def choose_precision(requested: str, device: str, bf16_supported: bool = False) -> str:
    """'auto' → bf16 on GPUs that support it, fp16 (with dynamic loss scaling) on older GPUs, fp32 on CPU."""
    if requested != "auto":
        if device == "cpu" and requested == "fp16":
            raise ConfigError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
        return requested
    if device == "cpu":
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step so that micro * accumulation * world = global batch."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    # Elastic (train.min_workers): the global batch of num_workers is kept on fewer workers.
    batch = t.global_batch_size or (t.micro_batch_size * t.num_workers if t.min_workers is not None else None)
    if batch is None:
        return 1
    if batch % per_step:
        raise ConfigError(f"train.global_batch_size={batch} is not a multiple of "
                          f"train.micro_batch_size * workers = {per_step}")
    return batch // per_step


def uses_client_optimizer(cfg: Config, device: str) -> bool:
    """On CPU without offload we hand DeepSpeed a torch AdamW (no fused-Adam C++ build); everywhere
    else DeepSpeed builds its own (FusedAdam on GPU, DeepSpeedCPUAdam with optimizer offload)."""
    return device == "cpu" and not cfg.deepspeed.offload_optimizer


def deepspeed_config(cfg: Config, world_size: int, device: str, precision: str,
                     hidden_size: int | None = None, load_universal: bool = False,
                     trainable_params: int | None = None) -> dict[str, Any]:
    """DeepSpeed's JSON config for this run. With the model's `hidden_size`, communication buckets
    and ZeRO-3's persistence threshold are sized to the model (the rules transformers uses for
    'auto': hidden², 0.9·hidden², 10·hidden) instead of fixed 5e7-element buckets, which on a
    small model would outweigh the memory ZeRO saves. On CPU (gloo, no overlap of communication
    with the backward: each bucket is one blocking round trip between the workers) the buckets
    instead cover all `trainable_params` (up to 5e7): hidden²-sized buckets cost a bert-small
    classifier ~80 all-reduces and ~100 ms of a ~280 ms step on 2 workers. `load_universal` makes the engine's
    load_checkpoint read a universal checkpoint (a resume on another worker count, see
    checkpoint.load_universal). deepspeed.extra still wins over all of these."""
    t, ds = cfg.train, cfg.deepspeed
    accum = accumulation_steps(cfg, world_size)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": ds.zero_stage},
    }
    zero = out["zero_optimization"]
    bucket = bucket_size(device, hidden_size, trainable_params)
    if ds.zero_stage >= 1:
        zero.update({"reduce_bucket_size": bucket, "contiguous_gradients": True, "overlap_comm": device != "cpu"})
    if ds.zero_stage >= 2:
        zero.update({"allgather_bucket_size": bucket, "reduce_scatter": True})
    if ds.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": int(0.9 * bucket),
                     "stage3_param_persistence_threshold": 10 * hidden_size if hidden_size else int(1e5),
                     "stage3_gather_16bit_weights_on_model_save": True})
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device != "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device != "cpu"}
    if precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    if not uses_client_optimizer(cfg, device):
        out["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8,
                                                         "weight_decay": t.weight_decay}}
    if t.activation_checkpointing:
        out["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    if load_universal:
        out["checkpoint"] = {"load_universal": True}
    return _merge(out, ds.extra)


def bucket_size(device: str, hidden_size: int | None, trainable_params: int | None) -> int:
    """Elements per ZeRO communication bucket: hidden² on an accelerator (buckets overlap the
    backward there), the whole trainable model on CPU (fewest blocking all-reduces); at most 5e7,
    DeepSpeed's default, which is also the choice when the model is not known yet."""
    if not hidden_size:
        return int(5e7)
    size = hidden_size**2
    if device == "cpu" and trainable_params:
        size = max(size, -(-trainable_params // 512) * 512)  # DeepSpeed wants buckets aligned (a multiple of 2)
    return int(min(5e7, size))


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate multiplier at optimizer step `step` (0-based): linear warmup to 1, then cosine
    decay to `min_lr_ratio` at `max_steps`."""
    t = cfg.train
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    decay_steps = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
