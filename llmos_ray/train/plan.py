"""`llmos plan`: size a cluster before paying for it — memory per device under each ZeRO stage and
FLOPs per optimizer step, from the config alone (nothing is built or started)."""

from __future__ import annotations

from typing import Optional

from llmos_ray.config import Config
from llmos_ray.models import flops_per_token, param_counts, preset_config, zero_memory_per_device

GIB = 1024**3


def plan_numbers(cfg: Config, num_devices: Optional[int] = None, vocab_size: Optional[int] = None) -> dict:
    """Parameters, FLOPs per step and per-device bytes of params/grads/optimizer for ZeRO 0-3."""
    from llmos_ray.train.deepspeed import accumulation_steps

    world = num_devices or cfg.train.num_workers
    hf = _model_config(cfg, vocab_size)
    n = param_counts(hf)["total"]
    seq = cfg.data.seq_len
    # On `world` devices: the same global batch (train.global_batch_size) with the accumulation it needs there.
    tokens_per_step = cfg.train.micro_batch_size * accumulation_steps(cfg, world) * world * seq
    return {
        "params": n, "devices": world, "seq_len": seq, "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token(hf, seq),
        "flops_per_step": flops_per_token(hf, seq) * tokens_per_step,
        "precision": planned_precision(cfg),
        "zero": {stage: zero_memory_per_device(n, stage, world, planned_precision(cfg)) for stage in range(4)},
    }


def planned_precision(cfg: Config) -> str:
    """The precision a plan assumes: train.precision, with 'auto' read as bf16 (what GPUs train in)."""
    return "bf16" if cfg.train.precision == "auto" else cfg.train.precision


def _model_config(cfg: Config, vocab_size: Optional[int]):
    if cfg.model.base:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.model.base, trust_remote_code=cfg.model.trust_remote_code)
    return preset_config(cfg.model.family, cfg.model.size, vocab_size or cfg.data.vocab_size, cfg.data.seq_len,
                         overrides=cfg.model.overrides)


def plan(cfg: Config, num_devices: Optional[int] = None) -> str:
    """The plan as a table for the terminal."""
    p = plan_numbers(cfg, num_devices)
    name = cfg.model.base or f"{cfg.model.family}-{cfg.model.size}"
    lines = [
        f"model {name}: {p['params'] / 1e6:,.1f}M parameters, seq_len {p['seq_len']}, "
        f"{p['tokens_per_step']:,} tokens/step on {p['devices']} devices",
        f"FLOPs: {p['flops_per_token']:.3e} per token, {p['flops_per_step']:.3e} per optimizer step",
        f"per-device memory on {p['devices']} devices ({p['precision']} Adam, 16 bytes/param before sharding; "
        f"activations not included):",
        f"{'ZeRO':>6} {'params GiB':>11} {'master GiB':>11} {'grads GiB':>10} {'optim GiB':>10} {'total GiB':>10}",
    ]
    for stage, m in p["zero"].items():
        marker = "  <- configured" if stage == cfg.deepspeed.zero_stage else ""
        lines.append(f"{stage:>6} {m['params'] / GIB:>11.2f} {m['master'] / GIB:>11.2f} {m['grads'] / GIB:>10.2f} "
                     f"{m['optimizer'] / GIB:>10.2f} {m['total'] / GIB:>10.2f}{marker}")
    return "\n".join(lines)
