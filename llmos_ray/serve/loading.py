"""Loading a served model: (model, tokenizer, device) from a ModelSpec.

    from llmos_ray.serve.loading import load_model
    model, tokenizer, device = load_model(ModelSpec(name="m", uri="runs/x/export"))

The source is a local or remote (fsspec) export, a hub id, or a LoRA adapter, which is merged
onto its base (serve.lora=merge, evaluation, the SDK; adapters on a shared base are
`adapters.LoraSet`'s, beside an unmerged base). The device and dtype follow the spec ('auto': a
GPU if this process sees one, bfloat16 there when supported, float32 on CPU); `quantize: int8`
applies dynamic quantization on CPU. Evaluation loads its models through here too.
"""

from __future__ import annotations

import logging
import os

from llmos_ray.errors import ModelError
from llmos_ray.serve.spec import ModelSpec
from llmos_ray.storage import localize

log = logging.getLogger(__name__)


def load_model(spec: ModelSpec):
    """(model, tokenizer, device) for a spec: local or remote export, hub id, or LoRA adapter over a base."""
    from llmos_ray.data.tokenizer import load_tokenizer
    from llmos_ray.models import load_pretrained

    device = choose_device(spec)
    dtype = choose_dtype(spec, device)
    uri = localize(spec.uri)
    kwargs = dict(trust_remote_code=spec.trust_remote_code, dtype=dtype)
    if spec.base_uri:
        from peft import PeftModel

        base_dir = localize(spec.base_uri)
        model = PeftModel.from_pretrained(load_pretrained(base_dir, **kwargs), uri).merge_and_unload()
        has_tokenizer = any(os.path.exists(os.path.join(uri, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
        tok_dir = uri if has_tokenizer else base_dir
    else:
        model, tok_dir = load_pretrained(uri, **kwargs), uri
    tokenizer = load_tokenizer(tok_dir)
    model.eval().to(device)
    if spec.quantize == "int8":
        if device != "cpu":
            raise ModelError(f"model {spec.name!r}: quantize=int8 (dynamic quantization) runs on CPU only")
        model = quantize_int8(model)
    log.info("loaded model %s from %s on %s (%s%s)", spec.name, spec.uri, device, dtype,
             ", int8" if spec.quantize == "int8" else "")
    return model, tokenizer, device


def choose_device(spec: ModelSpec) -> str:
    """'cuda' or 'cpu' for spec.device ('auto' = a GPU if this process sees one)."""
    import torch

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model {spec.name!r}: device=cuda but this replica sees no GPU")
    return "cuda" if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()) else "cpu"


def choose_dtype(spec: ModelSpec, device: str):
    """The torch dtype for spec.dtype ('auto': bfloat16 or float16 on GPU, float32 on CPU)."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(spec.dtype)
    if dtype is None:
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device == "cuda" \
            else torch.float32
    return dtype


def quantize_int8(model):
    """Dynamic int8 quantization of the linear layers (CPU). GPT-2's Conv1D layers become nn.Linear first."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data
                setattr(parent, child_name, linear)
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster this process is connected to (else this machine) has GPUs."""
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        pass
    import torch

    return torch.cuda.is_available()
