"""The model a training worker trains: which device, the model built or loaded (partitioned as it is
created under ZeRO-3), the distillation teacher, and DeepSpeed's ZeRO-3 fp32-partition fix."""

from __future__ import annotations

import logging
import os
from typing import Optional

from llmos_ray.config import Config
from llmos_ray.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def choose_device():
    """This worker's device: its local GPU when there is one (made current), else the CPU."""
    import torch

    if torch.cuda.is_available():
        import ray.train

        local = ray.train.get_context().get_local_rank()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def build_model(cfg: Config, tokenizer, ds_config: Optional[dict] = None, job: str = "pretrain",
                labels: Optional[list] = None):
    """A fresh preset model sized for `tokenizer`, or `model.base` loaded from a directory or the hub,
    with the head of the run's objective (tasks.objective: a causal LM, bert's masked LM, or a
    sequence classifier over `labels`, whose names go into its config as id2label/label2id). Under
    ZeRO-3 (`ds_config` given) a base model's parameters are partitioned as they are created
    (deepspeed.zero.Init through transformers) and filled tensor by tensor, so no rank holds it whole."""
    from transformers import AutoConfig

    from llmos_ray.models import auto_class, preset_config
    from llmos_ray.train.tasks import MODEL_TASKS, objective

    task = MODEL_TASKS.get(objective(cfg, job), objective(cfg, job))
    model_class = auto_class(task)
    zero3 = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    if cfg.model.base:
        base_dir = local_model_dir(cfg.model.base)
        hf_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=cfg.model.trust_remote_code)
    else:
        hf_config = preset_config(cfg.model.family, cfg.model.size, len(tokenizer), cfg.data.seq_len,
                                  bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                                  pad_id=tokenizer.pad_token_id, overrides=cfg.model.overrides)
    if task == "classification":
        _label_config(hf_config, labels or [], cfg.finetune.multi_label, tokenizer)
    if cfg.model.base and not zero3:
        model = model_class.from_pretrained(base_dir, config=hf_config, trust_remote_code=cfg.model.trust_remote_code,
                                            **({"ignore_mismatched_sizes": True} if task == "classification" else {}))
    elif not zero3 or not cfg.model.base:
        # A fresh model is built whole on every rank from the same seed and partitioned by
        # deepspeed.initialize: transformers' ZeRO-3 initialisation under zero.Init leaves some
        # weights uninitialised in the versions we test with (NaN losses). Costs host memory for
        # the full model per rank while building; loading a base model below does not.
        model = model_class.from_config(hf_config)
    else:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # transformers checks a weak reference to it while building
        model = model_class.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
        load_weights_zero3(model, base_dir, new_head=task == "classification")
        del keep
    # Checkpoints save this config: its architectures tell export and serving which class to build.
    model.config.architectures = [type(model).__name__]
    return model


def _label_config(hf_config, labels: list, multi_label: bool, tokenizer) -> None:
    """A classifier's labels (names from the training split) and how it pools padded batches."""
    hf_config.num_labels = len(labels)
    hf_config.id2label = dict(enumerate(labels))
    hf_config.label2id = {name: i for i, name in enumerate(labels)}
    hf_config.problem_type = "multi_label_classification" if multi_label else "single_label_classification"
    if getattr(hf_config, "pad_token_id", None) is None:  # decoder classifiers pool the last non-pad token
        hf_config.pad_token_id = tokenizer.pad_token_id


def local_model_dir(name_or_path: str) -> str:
    """A local directory for a model directory or hub id (downloaded into the Hugging Face cache)."""
    from llmos_ray.models import is_local_model

    if is_local_model(name_or_path):
        return os.path.expanduser(name_or_path)
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])


def load_weights_zero3(model, model_dir: str, new_head: bool = False) -> None:
    """Copy a safetensors checkpoint into a ZeRO-3 partitioned model one tensor at a time (rank 0
    reads, DeepSpeed re-partitions), so no rank materialises the whole model. transformers'
    own ZeRO-3 loading path leaves some weights unloaded in the version we test with. With
    `new_head` (a classifier on a base model), the weights the base lacks outside the base model
    (the head, bert's pooler) are initialised by the model's own rule instead (rank 0)."""
    import glob

    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ModelError(f"{model_dir} has no *.safetensors weights (needed to load under ZeRO-3)")
    params = dict(model.named_parameters())
    loaded = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                param = params.get(key)
                if param is None:
                    continue
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if dist.get_rank() == 0:
                        param.data.copy_(f.get_tensor(key))
                loaded.add(key)
    tied = {k for k, p in params.items() if k not in loaded and any(p is params[o] for o in loaded)}
    missing = set(params) - loaded - tied
    if new_head and missing:
        _init_new_weights(model, missing)
        return
    if missing:
        raise ModelError(f"weights missing from {model_dir}: {sorted(missing)[:5]}")


def _init_new_weights(model, names: set[str]) -> None:
    """Initialise the modules holding `names` (gathered, on rank 0) with the model's _init_weights."""
    import deepspeed
    import torch.distributed as dist

    modules = {name.rsplit(".", 1)[0] for name in names}
    for module_name, module in model.named_modules():
        if module_name in modules:
            with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
                if dist.get_rank() == 0:
                    model._init_weights(module)


def load_teacher(cfg: Config, device):
    """The frozen teacher of a distillation run, in eval mode on this worker's device."""
    from llmos_ray.models import load_pretrained

    if not cfg.distill.teacher:
        raise ConfigError("distillation needs distill.teacher (a model directory or hub id)")
    teacher = load_pretrained(cfg.distill.teacher, trust_remote_code=cfg.model.trust_remote_code).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def share_fp32_partitions(engine) -> int:
    """Work around DeepSpeed 0.19's redundant fp32 copy of each ZeRO-3 partition; returns the bytes freed.

    When the weights are already fp32 on the optimizer's device (fp32 training without optimizer
    offload), ZeRO-3 means to let the optimizer update the parameter partitions themselves
    (stage3.py `_create_fp32_partitions`: "we don't need another copy of the weights"), but its
    test compares `tensor.device` with a device *string* (`torch.device('cpu') == 'cpu'` is
    False, and so is 'cuda:0'), so it always clones: +4 bytes/parameter/N per rank, a quarter
    more than ZeRO-3 needs in fp32. Here each fp32 partition that is provably a plain copy (same
    dtype, device and shape, equal values) is replaced by the partition it copies, as DeepSpeed's
    intended branch does, before any optimizer state exists. A no-op for every other case
    (mixed precision, offload, NVMe swap, other stages) and once DeepSpeed reuses the tensor itself."""
    import torch

    zero = engine.optimizer
    hps = getattr(zero, "fp32_partitioned_groups_flat", None)
    lps = getattr(zero, "fp16_partitioned_groups_flat", None)
    if not hps or not lps or getattr(zero, "offload_optimizer", True) or getattr(zero, "swap_optimizer", True) \
            or getattr(zero, "params_in_nvme_and_cpu", True) or engine.global_steps != 0:
        return 0
    freed = 0
    for i, (hp, lp) in enumerate(zip(hps, lps)):
        if lp is None or hp is lp or hp.dtype != lp.dtype or hp.device != lp.device or hp.shape != lp.shape \
                or hp.grad is not None or hp in zero.optimizer.state or not torch.equal(hp, lp):
            continue
        lp.ds_id = hp.ds_id
        lp.requires_grad = True  # as DeepSpeed sets on its fp32 partitions
        hps[i] = lp
        freed += hp.numel() * hp.element_size()
    if freed:
        log.info("ZeRO-3 fp32: the optimizer updates the parameter partitions in place (%.1f MiB not copied)",
                 freed / 2**20)
    return freed
