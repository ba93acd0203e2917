"""LoRA adapters (peft) for fine-tuning: which modules get them and how they are configured.
A leaf module: the training loop applies them, checkpoint export rebuilds them."""

from __future__ import annotations

from llmos_ray.config import Config
from llmos_ray.errors import ConfigError

LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "bert": ["query", "value"],
                "t5": ["q", "v"]}
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
"""peft's task type per model task; SEQ_CLS also trains (and saves) the classification head whole."""


def lora_config(cfg: Config, model_type: str, task: str = "causal_lm"):
    from peft import LoraConfig

    targets = cfg.finetune.lora_target_modules or LORA_TARGETS.get(model_type)
    if not targets:
        raise ConfigError(f"finetune.lora_target_modules is empty and there is no default for {model_type!r}")
    return LoraConfig(r=cfg.finetune.lora_r, lora_alpha=cfg.finetune.lora_alpha, lora_dropout=cfg.finetune.lora_dropout,
                      target_modules=targets, task_type=PEFT_TASK_TYPES.get(task, "CAUSAL_LM"),
                      fan_in_fan_out=model_type == "gpt2")  # GPT-2's Conv1D stores weights transposed


def apply_lora(model, cfg: Config, task: str = "causal_lm"):
    """Wrap `model` with LoRA adapters (peft); only the adapters (and a classifier's head) train."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg, model.config.model_type, task))
