"""llmos-ray: an LLM operating system on Ray.

    import llmos_ray
    cfg = llmos_ray.load_config("jobs/configs/pretrain_tiny.yaml", ["train.max_steps=20"])
    result = llmos_ray.pretrain(cfg)          # Ray Train + DeepSpeed ZeRO
    print(result.export_dir)                  # a plain Hugging Face model directory

    from llmos_ray import LLM, Chatbot        # the SDK: a model in this process or behind a server
    chatbot = Chatbot(LLM.from_pretrained(result.export_dir))
    print(chatbot.generate_response("Hello"))

Heavy dependencies (ray, torch, deepspeed) load on first use of the function that needs them.
"""

from llmos_ray.config import Config, load_config
from llmos_ray.errors import CheckpointError, ConfigError, DataError, LlmosError, ModelError

__version__ = "0.1.0"

_LAZY = {
    "prepare_data": ("llmos_ray.data", "prepare"),
    "pretrain": ("llmos_ray.train", "pretrain"),
    "finetune": ("llmos_ray.train.finetune", "finetune"),
    "distill": ("llmos_ray.train.finetune", "distill"),
    "evaluate": ("llmos_ray.eval", "evaluate"),
    "export": ("llmos_ray.train.checkpoint", "export"),
    "plan": ("llmos_ray.train.plan", "plan"),
    "prune": ("llmos_ray.pruning", "prune"),
    "LLM": ("llmos_ray.sdk", "LLM"),
    "Chatbot": ("llmos_ray.sdk", "Chatbot"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmos_ray' has no attribute {name!r}")


__all__ = ["Config", "load_config", "LlmosError", "ConfigError", "DataError", "ModelError", "CheckpointError",
           *_LAZY]
