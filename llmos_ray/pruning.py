"""`prune(model, out_dir, sparsity=0.5)`: a pruned copy of a model, its perplexity before and after,
an export plain transformers loads and `llmos serve` serves, an optional recovery run, and a
model library entry with its lineage.

    from llmos_ray import prune
    report = prune("tiny:prod", "runs/tiny-pruned", sparsity=0.5)                 # unstructured
    report = prune("tiny", "runs/tiny-narrow", sparsity=0.5, structured=True)     # MLP neurons removed
    llmos prune tiny runs/tiny-pruned --sparsity 0.5 [--structured] [--recover-steps 50] [--register tiny-pruned]

- Unstructured (default): magnitude pruning with `torch.nn.utils.prune.l1_unstructured` of every
  linear layer of the transformer blocks (attention and MLP projections; embeddings, the LM head
  and norms are kept), each to exactly `sparsity`; the mask is then made permanent. Zeros are
  stored densely: the export has the same shape and size, `sparsity` of those weights zero.
- Structured (`structured=True`): MLP neurons, really removed. Per block,
  `torch.nn.utils.prune.ln_structured` ranks the neurons of the MLP's input projection by L2 norm
  and the lowest `sparsity` of them are cut from the input and output projections; every block
  keeps the same number, so the export's config says one smaller intermediate size (n_inner,
  intermediate_size) and the model is smaller. Attention heads are not pruned: a transformers
  config has one head count for every layer, and GPT-2 ties the head size to the width.
- Measured sparsity is reported: zero weights among the pruned ones (unstructured), neurons
  removed (structured); it equals the target up to rounding to whole weights or neurons.
- Perplexity (eval.metrics.perplexity, sliding windows) before and after, on held-out text: the
  validation split of the config's data section — by default the config the model was trained
  with (llmos_config.yaml in its export) — or eval.perplexity_paths; eval.max_documents of them.
- Recovery (`recover_steps` > 0): that many steps of causal-LM training of the pruned model on
  the config's corpus through the usual trainer (`llmos_ray.pretrain` with model.base = the
  pruned export). It trains every weight, so for unstructured pruning the masks are applied to
  its export again: the sparsity stays exact. Perplexity is reported after recovery too.
- `prune_report.json` in the export holds every figure; with `register`, the export becomes a
  model library entry whose lineage names the source model, the method and the figures.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional

from llmos_ray.config import Config, load_config
from llmos_ray.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

REPORT = "prune_report.json"
DEFAULT_DOCUMENTS = 64


def prune(model: str, out_dir: str, *, sparsity: float = 0.5, structured: bool = False,
          config: Optional[Config] = None, recover_steps: int = 0, register: Optional[str] = None) -> dict[str, Any]:
    """Prune `model` (a library reference, directory or URI) to `sparsity` into `out_dir`; the report."""
    from llmos_ray import registry
    from llmos_ray.serve.loading import load_model
    from llmos_ray.serve.spec import ModelSpec

    if not 0 < sparsity < 1:
        raise ConfigError(f"--sparsity must be in (0, 1), got {sparsity}")
    if recover_steps < 0:
        raise ConfigError(f"--recover-steps must be >= 0, got {recover_steps}")
    if register is not None:
        registry.validate_name(register)
    reg = config.registry.uri if config is not None else None
    uri, base, entry = registry.resolve_source(model, reg)
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    net, tokenizer, _ = load_model(ModelSpec(name="prune", uri=uri, base_uri=base, device="cpu", dtype="float32"))
    cfg = _config(config, uri)
    texts, window = _validation(cfg, net)
    report: dict[str, Any] = {"source": model, "uri": uri, "registry_ref": (entry or {}).get("ref"),
                              "out_dir": out_dir, "sparsity_target": sparsity,
                              "method": STRUCTURED if structured else UNSTRUCTURED, "parameters_before": _count(net)}
    report["perplexity_before"] = _perplexity(net, tokenizer, texts, window)
    report.update(prune_mlp_neurons(net, sparsity) if structured else prune_unstructured(net, sparsity))
    report["parameters_after"] = _count(net)
    report["perplexity_after"] = _perplexity(net, tokenizer, texts, window)
    _save(net, tokenizer, uri, out_dir)
    if recover_steps:
        masks = None if structured else {n: p == 0 for n, p in _prunable_weights(net)}
        net = recover(cfg, out_dir, recover_steps, masks, report)
        report["perplexity_recovered"] = _perplexity(net, tokenizer, texts, window)
        if masks is not None:
            report["sparsity_measured"] = measured_sparsity(net)
    report["validation"] = {"documents": len(texts), "max_length": window,
                            "tokens": report["perplexity_before"]["tokens"]}
    if register is not None:
        report["registered"] = _register(register, model, entry, report, reg)
    _write_report(out_dir, report)
    return report


UNSTRUCTURED = "unstructured magnitude (torch.nn.utils.prune.l1_unstructured) of the blocks' linear layers"
STRUCTURED = "structured: MLP neurons removed (torch.nn.utils.prune.ln_structured, L2 norm of the input projection)"


def prune_unstructured(model, sparsity: float) -> dict[str, Any]:
    """Zero the smallest-magnitude `sparsity` of each prunable weight, permanently."""
    from torch.nn.utils import prune as torch_prune

    modules = _prunable_modules(model)
    if not modules:
        raise ModelError("no linear layers to prune in the model's blocks")
    for module in modules:
        torch_prune.l1_unstructured(module, "weight", amount=sparsity)
        torch_prune.remove(module, "weight")
    return {"sparsity_measured": measured_sparsity(model), "layers_pruned": len(modules)}


def measured_sparsity(model) -> float:
    """Zero weights among the prunable ones."""
    weights = [p for _, p in _prunable_weights(model)]
    return float(sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights))


def prune_mlp_neurons(model, sparsity: float) -> dict[str, Any]:
    """Remove the lowest-norm `sparsity` of every block's MLP neurons (the same count per block)."""
    import torch
    from torch.nn.utils import prune as torch_prune

    family = model.config.model_type
    if family not in MLP_LAYOUT:
        raise ModelError(f"structured pruning knows the MLPs of {', '.join(MLP_LAYOUT)}; this model is {family!r} "
                         "(use unstructured pruning)")
    ins, out, in_dim, size_key = MLP_LAYOUT[family]
    blocks = [m for m in model.modules() if all(hasattr(m, n) for n in (*ins, out))]
    width = getattr(blocks[0], ins[0]).weight.shape[in_dim]
    with torch.no_grad():
        for mlp in blocks:
            ranker = getattr(mlp, ins[-1])
            torch_prune.ln_structured(ranker, "weight", amount=sparsity, n=2, dim=in_dim)
            keep = ranker.weight_mask.flatten(start_dim=1).any(dim=1) if in_dim == 0 else \
                ranker.weight_mask.any(dim=0)
            torch_prune.remove(ranker, "weight")
            index = keep.nonzero().flatten()
            for name in ins:
                setattr(mlp, name, _narrowed(getattr(mlp, name), index, output=True))
            setattr(mlp, out, _narrowed(getattr(mlp, out), index, output=False))
    kept = len(index)
    setattr(model.config, size_key, kept)
    return {"sparsity_measured": 1 - kept / width, "neurons_per_block": {"before": width, "after": kept},
            "blocks_pruned": len(blocks)}


MLP_LAYOUT = {
    # family: (input projections (the last one ranks the neurons), output projection, neuron dim of an
    # input projection's weight, config key of the MLP width)
    "gpt2": (("c_fc",), "c_proj", 1, "n_inner"),
    "llama": (("gate_proj", "up_proj"), "down_proj", 0, "intermediate_size"),
}


def _narrowed(layer, index, output: bool):
    """A copy of a Linear or Conv1D keeping the neurons `index` on its output (or input) side."""
    import torch
    from transformers.pytorch_utils import Conv1D

    w = layer.weight.data
    if isinstance(layer, Conv1D):  # weight (in, out)
        weight = w[:, index] if output else w[index, :]
        new = Conv1D(weight.shape[1], weight.shape[0])
        new.weight.data = weight.clone()
        new.bias.data = (layer.bias.data[index] if output else layer.bias.data).clone()
        return new
    weight = w[index, :] if output else w[:, index]  # nn.Linear: weight (out, in)
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    new.weight.data = weight.clone()
    if layer.bias is not None:
        new.bias.data = (layer.bias.data[index] if output else layer.bias.data).clone()
    return new


def _prunable_modules(model) -> list:
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]


def _prunable_weights(model) -> list[tuple[str, Any]]:
    ids = {id(m) for m in _prunable_modules(model)}
    return [(f"{name}.weight", m.weight) for name, m in model.named_modules() if id(m) in ids]


def _count(model) -> int:
    from llmos_ray.models import count_parameters

    return count_parameters(model)


# ---------------------------------------------------------------------------------------------
# Measuring, saving, recovering, registering


def _config(config: Optional[Config], uri: str) -> Config:
    """The config whose data section holds the validation text: the one given, else the model's own."""
    if config is not None:
        return config
    own = os.path.join(uri, "llmos_config.yaml")
    return load_config(own) if os.path.isfile(own) else load_config()


def _validation(cfg: Config, model) -> tuple[list[str], int]:
    """(held-out documents, perplexity window) for `cfg`."""
    import copy
    import itertools

    from llmos_ray.data import iter_documents
    from llmos_ray.models import context_length

    data = copy.deepcopy(cfg.data)
    if cfg.eval.perplexity_paths:
        data.val_paths = list(cfg.eval.perplexity_paths)
    texts = list(itertools.islice(iter_documents(data, "val"), cfg.eval.max_documents or DEFAULT_DOCUMENTS))
    if not texts:
        raise ConfigError("no validation documents to measure perplexity on: set eval.perplexity_paths=[FILE] or a "
                          "data section with a validation split")
    window = min(cfg.eval.max_length or cfg.data.seq_len, context_length(model.config))
    return texts, window


def _perplexity(model, tokenizer, texts: list[str], window: int) -> dict[str, Any]:
    from llmos_ray.eval.metrics import perplexity

    model.eval()
    return perplexity(model, tokenizer, texts, max_length=window)


def _save(model, tokenizer, source_uri: str, out_dir: str) -> None:
    """A Hugging Face directory (complete or absent): weights, config, tokenizer, generation config."""
    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    generation = os.path.join(source_uri, "generation_config.json")
    if os.path.isfile(generation):
        shutil.copy(generation, os.path.join(tmp, "generation_config.json"))
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def recover(cfg: Config, out_dir: str, steps: int, masks: Optional[dict], report: dict):
    """Train the pruned export `steps` steps (the usual trainer), masks re-applied; the recovered model."""
    import copy

    import torch

    from llmos_ray.data import load_tokenizer
    from llmos_ray.models import load_pretrained
    from llmos_ray.train import pretrain

    run = copy.deepcopy(cfg)
    run.model.base = run.data.tokenizer = out_dir
    run.train.max_steps = steps
    run.run.name, run.run.output_dir = f"{os.path.basename(out_dir)}-recovery", f"{out_dir}-recovery"
    run.run.storage_path, run.run.resume = None, "never"
    shutil.rmtree(run.run.output_dir, ignore_errors=True)  # this command's own run: a new one each time
    result = pretrain(run.validate())
    model = load_pretrained(result.export_dir, dtype=torch.float32)
    if masks is not None:
        with torch.no_grad():
            for name, weight in _prunable_weights(model):
                weight[masks[name]] = 0
    report["recovery"] = {"steps": steps, "run": result.output_dir, "final_loss": result.metrics.get("loss")}
    _save(model, load_tokenizer(out_dir), out_dir, out_dir)
    return model


def _register(name: str, source: str, entry: Optional[dict], report: dict, reg: Optional[str]) -> str:
    from llmos_ray import registry

    after = report.get("perplexity_recovered") or report["perplexity_after"]
    pruning = {k: report[k] for k in ("method", "sparsity_target", "sparsity_measured", "parameters_before",
                                      "parameters_after")}
    pruning["perplexity_before"] = report["perplexity_before"]["perplexity"]
    e = registry.register(name, report["out_dir"], base_model=(entry or {}).get("ref") or source,
                          source_run=(report.get("recovery") or {}).get("run") or "llmos prune",
                          data_stats=(entry or {}).get("data_stats"), eval={"perplexity": after["perplexity"]},
                          registry=reg, pruning=pruning)
    return e.ref


def _write_report(out_dir: str, report: dict) -> None:
    from llmos_ray.storage import write_text

    write_text(os.path.join(out_dir, REPORT), json.dumps(report, indent=1))


def summary(report: dict, command: str = "llmos") -> str:
    """What `llmos prune` prints."""
    before, after = report["perplexity_before"]["perplexity"], report["perplexity_after"]["perplexity"]
    lines = [f"pruned {report['source']}: {report['method']}",
             f"  sparsity    target {report['sparsity_target']:.3f}, measured {report['sparsity_measured']:.4f}",
             f"  parameters  {report['parameters_before']:,} -> {report['parameters_after']:,}",
             f"  perplexity  {before:.2f} -> {after:.2f} on {report['validation']['documents']} held-out documents "
             f"({report['validation']['tokens']:,} tokens)"]
    if "perplexity_recovered" in report:
        lines.append(f"  recovered   {report['perplexity_recovered']['perplexity']:.2f} after "
                     f"{report['recovery']['steps']} steps ({report['recovery']['run']})")
    lines.append(f"  model:      {report['out_dir']}  (report: {os.path.join(report['out_dir'], REPORT)})")
    if report.get("registered"):
        lines.append(f"  registered: {report['registered']}")
    lines.append(f"next: {command} serve --model {report.get('registered') or report['out_dir']}")
    return "\n".join(lines)
