"""Serve fixtures: a LoRA adapter over the tiny model, and free ports."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lora_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A peft LoRA adapter (random, non-zero B) on the tiny model's attention: changes its outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    out = str(tmp_path_factory.mktemp("lora") / "adapter")
    get_peft_model(model, config).save_pretrained(out)
    return out
