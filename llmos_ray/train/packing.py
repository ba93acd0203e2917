"""Packed rows with boundaries (data.packing=reset) → model inputs where each segment stands alone.

A row packs several documents (pretraining) or examples (fine-tuning). With boundaries, every
token knows its segment: position ids restart at 0 where a segment starts, a token attends only to
earlier tokens of its own segment, and no target crosses a boundary (the first token of a segment
is never predicted from the previous one). Each segment then gets exactly the per-token loss it
would get alone — the packing-correctness fix other trainers made (axolotl #3796, LLaMA-Factory
#7318, TRL #3526).

Where the boundaries come from:
    packed blocks [B, T+1]                 documents joined with EOS: a segment ends at each EOS
                                           (its EOS included, as Megatron's reset_position_ids does)
    packed with boundaries [B, 3, T+1]     rows of (tokens, loss mask, segment id): fine-tuning
                                           examples packed by data.sft.pack_examples; id 0 is the
                                           padding after a row's last example

One code path, chosen by the model's attention implementation (`model_inputs`): FlashAttention
(`flash_attn` installed, GPU, bf16/fp16) gets the micro-batch flattened into one row with
restarting position ids, which transformers turns into `flash_attn_varlen_func` over cu_seqlens;
every other implementation (SDPA on CPU) gets a 4-D block-diagonal causal mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BOUNDARY_CHANNELS = 3
"""Rows of the packed-with-boundaries format: tokens, loss mask, segment id."""


def segments_from_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Segment ids (1, 2, …) of packed blocks [B, L]: a new segment starts after each EOS."""
    ends = (tokens == eos_id).astype(np.int64)
    return 1 + np.cumsum(ends, axis=-1) - ends


def positions(segments: np.ndarray) -> np.ndarray:
    """Position ids that restart at 0 where each segment starts, per row of `segments` [B, L]."""
    b, n = segments.shape
    idx = np.broadcast_to(np.arange(n), (b, n))
    starts = np.ones((b, n), dtype=bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
    return idx - first


def boundary_batch(micro: np.ndarray, device, eos_id: int | None = None) -> dict[str, Any]:
    """Model inputs, targets, position ids and segment ids of packed rows with boundaries: packed
    blocks [B, T+1] split at `eos_id`, or rows [B, 3, T+1] of (tokens, loss mask, segment)."""
    import torch

    if micro.ndim == 3:
        tokens, mask, segments = micro[:, 0], micro[:, 1], micro[:, 2].astype(np.int64)
    else:
        if eos_id is None:
            raise ValueError("packed blocks need the EOS id to find their documents' boundaries")
        tokens, mask, segments = micro, np.ones_like(micro), segments_from_eos(micro, eos_id)
    same = segments[:, 1:] == segments[:, :-1]
    targets = np.where((mask[:, 1:] == 1) & same, tokens[:, 1:], -100)
    seg_in = segments[:, :-1]

    def tensor(a):
        return torch.tensor(np.ascontiguousarray(a), dtype=torch.long, device=device)

    return {"input_ids": tensor(tokens[:, :-1]), "targets": tensor(targets), "position_ids": tensor(positions(seg_in)),
            "segments": tensor(seg_in)}


def uses_flash_attention(model) -> bool:
    config = getattr(getattr(model, "module", model), "config", None)
    return str(getattr(config, "_attn_implementation", "")).startswith("flash_attention")


def model_inputs(model, batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the forward pass for `batch` (from `boundary_batch`, or a plain one
    with input_ids only) on `model` (a DeepSpeed engine or a transformers model)."""
    if "segments" not in batch:
        return {"input_ids": batch["input_ids"]}
    ids, pos, seg = batch["input_ids"], batch["position_ids"], batch["segments"]
    if uses_flash_attention(model):
        # transformers' padding-free path: one row, sequences found from restarting position ids
        # (modeling_flash_attention_utils._is_packed_sequence), attention by flash_attn_varlen_func.
        return {"input_ids": ids.reshape(1, -1), "position_ids": pos.reshape(1, -1)}
    return {"input_ids": ids, "position_ids": pos, "attention_mask": block_causal_mask(seg, model)}


def block_causal_mask(segments, model):
    """[B, 1, T, T] mask: query i sees key j <= i of the same segment. Boolean (True = attend) for
    SDPA, additive in the model's dtype for eager attention."""
    import torch

    n = segments.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = mask[:, None]
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        dtype = next(getattr(model, "module", model).parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask
