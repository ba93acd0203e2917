"""LoRA adapters side by side on one shared base model: each row of a batch gets its own adapter.

    files = read_adapter("runs/sft/adapter")          # the adapter's weights, checked (ModelError says why)
    adapters = LoraSet(model)                          # the base, shared; its target layers get a hook on demand
    slot = adapters.add("sql", files)                  # shapes checked against the base first
    with adapters.rows([slot, None, slot]):            # this thread's forward passes: row i gets its adapter,
        model(input_ids=ids, past_key_values=cache)    # row 1 (None) is the base alone, exactly
    adapters.remove("sql")

Per target layer (a linear or GPT-2 Conv1D an adapter targets), a forward hook takes the base's
output y = base(x) and gives the rows that have an adapter `y[rows] += (x[rows] @ A[slot]) @ B[slot]`:
two batched matmuls over the rows' own A (in x r) and B (r x out, the adapter's scaling alpha/r or
alpha/sqrt(r) folded in), gathered from one stacked tensor per layer (ranks padded with zeros). Rows
without an adapter are never touched, so they get exactly the base's output; a layer an adapter does
not target adds zeros for its rows. It is our own per-row delta rather than peft's mixed-adapter
batches (`adapter_names=`), which on every forward pass scans the whole model, registers a hook on
every LoRA layer and loops over the batch's adapters per layer (bench/multi_lora.py measures both).
The selection is per thread, so the engine's decode loop and an embeddings call on another thread
never see each other's rows.

Supported: plain LoRA (peft_type LORA) on linear layers, any rank per module (rank_pattern,
alpha_pattern), rsLoRA. Refused with the reason: DoRA, trained biases, modules_to_save (whole copied
modules), embedding adapters and the other peft variants that are not a low-rank delta of a linear
layer — serve those merged (serve.model_options.NAME.lora=merge).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from llmos_ray.errors import ModelError

NEUTRAL = {"use_dora": (False, None), "bias": ("none", None), "lora_bias": (False, None), "use_qalora": (False, None),
           "alora_invocation_tokens": (None,), "layer_replication": (None,), "modules_to_save": (None, []),
           "trainable_token_indices": (None,), "target_parameters": (None, []), "velora_config": (None,),
           "monteclora_config": (None,)}
"""adapter_config.json options that change the maths when set: the values that leave a plain low-rank delta."""
PREFIX = "base_model.model."


@dataclass
class AdapterFiles:
    """A LoRA adapter read from its directory: the low-rank factors per module of the base."""

    path: str
    base: Optional[str]
    """base_model_name_or_path in adapter_config.json."""
    deltas: dict[str, tuple[Any, Any]]
    """Module path in the base -> (A: in x r, B: r x out with the scaling folded in)."""


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json"))


def read_adapter(path: str) -> AdapterFiles:
    """The LoRA adapter in local directory `path`; ModelError naming what is not a plain LoRA adapter."""
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    if not is_adapter_dir(path):
        raise ModelError(f"{path} is not a LoRA adapter directory (no adapter_config.json, or it is a whole model)")
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{path} is a {config.get('peft_type')} adapter; only LoRA adapters share a base")
    for key, neutral in NEUTRAL.items():
        if config.get(key) not in neutral:
            raise ModelError(f"LoRA adapter {path} sets {key}={config[key]!r}, which a shared base cannot apply as a "
                             "per-row low-rank delta: serve it merged (serve.model_options.NAME.lora=merge)")
    try:
        weights = load_peft_weights(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - a missing or broken weights file
        raise ModelError(f"LoRA adapter {path}: cannot read its weights: {type(e).__name__}: {e}") from None
    factors: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ModelError(f"LoRA adapter {path} holds {key!r}, which is not a LoRA factor of a linear layer: serve "
                             "it merged (serve.model_options.NAME.lora=merge)")
        factors.setdefault(module, {})[part[0]] = tensor
    deltas = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            raise ModelError(f"LoRA adapter {path}: module {module!r} lacks one of its factors or their ranks differ")
        rank = pair["A"].shape[0]
        alpha = (config.get("alpha_pattern") or {}).get(get_pattern_key(list(config.get("alpha_pattern") or {}),
                                                                        module), config.get("lora_alpha", 8))
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        deltas[module] = (pair["A"].float().t().contiguous(), (pair["B"].float() * scaling).t().contiguous())
    if not deltas:
        raise ModelError(f"LoRA adapter {path} has no weights")
    return AdapterFiles(path, config.get("base_model_name_or_path"), deltas)


def features(module) -> Optional[tuple[int, int]]:
    """(in, out) features of a linear-like layer (nn.Linear, dynamically quantized Linear, GPT-2's
    Conv1D), else None."""
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.weight.shape[0]), int(module.nf)
    return None


class LoraSet:
    """LoRA adapters on one base model, each in a slot; `rows` says which slot each row of the next
    forward passes uses. Not thread-safe for add/remove against a running forward: the engine calls
    them between two steps."""

    def __init__(self, model):
        self.model = model
        self.names: dict[str, int] = {}
        """Adapter name -> slot."""
        self._slots: list[Optional[str]] = []
        self._layers: dict[str, LoraLayer] = {}
        self._local = threading.local()
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype

    def check(self, files: AdapterFiles) -> None:
        """ModelError unless every module the adapter targets is a linear layer of the base of its shapes."""
        for path, (a, b) in files.deltas.items():
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                raise ModelError(f"LoRA adapter {files.path} targets {path!r}, which this base model does not have: "
                                 "it was trained on another base") from None
            shape = features(module)
            if shape is None:
                raise ModelError(f"LoRA adapter {files.path} targets {path!r}, a {type(module).__name__}; only linear "
                                 "layers take a shared-base adapter")
            if shape != (a.shape[0], b.shape[1]):
                raise ModelError(f"LoRA adapter {files.path}: {path!r} is {a.shape[0]} -> {b.shape[1]} in the adapter "
                                 f"but {shape[0]} -> {shape[1]} in this base model: it was trained on another base")

    def add(self, name: str, files: AdapterFiles, busy: Sequence[int] = ()) -> int:
        """Put adapter `name` in a free slot (none of `busy`: slots rows still decode with) and return it."""
        if name in self.names:
            raise ModelError(f"adapter {name!r} is already loaded")
        self.check(files)
        free = [i for i, n in enumerate(self._slots) if n is None and i not in busy]
        slot = free[0] if free else len(self._slots)
        if slot == len(self._slots):
            self._slots.append(None)
        for path in files.deltas:
            if path not in self._layers:
                self._layers[path] = LoraLayer(self.model.get_submodule(path), self._local)
        for path, layer in self._layers.items():
            a, b = files.deltas.get(path, (None, None))
            layer.put(slot, len(self._slots), None if a is None else (a.to(self._device, self._dtype),
                                                                    b.to(self._device, self._dtype)))
        self._slots[slot], self.names[name] = name, slot
        return slot

    def remove(self, name: str) -> int:
        """Take adapter `name` out of use; its slot's weights stay until a new adapter takes the slot (rows
        admitted before still decode with them). Returns the slot."""
        slot = self.names.pop(name)
        self._slots[slot] = None
        return slot

    @contextlib.contextmanager
    def rows(self, slots: Sequence[Optional[int]]) -> Iterator[None]:
        """Within: this thread's forward passes give row i the adapter in slots[i] (None: the base)."""
        import torch

        chosen = [i for i, s in enumerate(slots) if s is not None]
        if not chosen:
            yield
            return
        rows = None if len(chosen) == len(slots) else torch.tensor(chosen, device=self._device)
        index = torch.tensor([slots[i] for i in chosen], device=self._device)
        self._local.sel = (len(slots), rows, index)
        try:
            yield
        finally:
            self._local.sel = None


class LoraLayer:
    """The low-rank deltas of every adapter slot on one base layer, added by a forward hook to the
    output rows that chose a slot (the layer itself is left as it is)."""

    def __init__(self, base, local: threading.local):
        self.base = base
        self._local = local
        self._factors: dict[int, tuple[Any, Any]] = {}
        self.A = self.B = None  # (slots, in, r) and (slots, r, out), zeros where a slot has no delta here
        self.hook = base.register_forward_hook(self._forward)

    def put(self, slot: int, slots: int, factors: Optional[tuple[Any, Any]]) -> None:
        """Set (or clear, with None) the delta of `slot`, and restack for `slots` slots."""
        if factors is None:
            self._factors.pop(slot, None)
        else:
            self._factors[slot] = factors
        if not self._factors:
            self.A = self.B = None
            return
        a0, b0 = next(iter(self._factors.values()))
        rank = max(a.shape[1] for a, _ in self._factors.values())
        self.A = a0.new_zeros((slots, a0.shape[0], rank))
        self.B = b0.new_zeros((slots, rank, b0.shape[1]))
        for s, (a, b) in self._factors.items():
            self.A[s, :, :a.shape[1]] = a
            self.B[s, :b.shape[0], :] = b

    def _forward(self, module, args, y):
        sel = getattr(self._local, "sel", None)
        if sel is None or self.A is None:
            return None  # the base's output as it is
        import torch

        x, (batch, rows, index) = args[0], sel
        if x.shape[0] != batch:
            raise ModelError(f"a LoRA layer got {x.shape[0]} rows in a forward pass chosen for {batch}")
        xs = (x if rows is None else x.index_select(0, rows)).reshape(len(index), -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(xs.to(self.A.dtype), self.A.index_select(0, index)), self.B.index_select(0, index))
        delta = delta.to(y.dtype).reshape((len(index),) + y.shape[1:])
        return y + delta if rows is None else y.index_add(0, rows, delta)
