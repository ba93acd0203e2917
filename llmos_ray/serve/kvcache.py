"""The running batch's KV cache and attention mask, as the engine's continuous batching reshapes them.

    cache, mask = join(cache, mask, new_cache, new_mask)    # newcomers' prefilled rows after the running ones
    cache, mask = keep(cache, mask, index, trim=True)       # the rows still decoding; unused columns dropped
    mergeable(cache)                                        # whether a model's cache can be joined at all

Both caches are left-padded to the same length (padding is masked out and holds zeros), so rows of
any prompt length share one tensor per layer. Only transformers' DynamicCache (every layer a
DynamicLayer) is reshaped here; other cache types make the engine batch only requests that arrive
together.
"""

from __future__ import annotations


def mergeable(cache) -> bool:
    """Whether `cache` (a model's past_key_values) is a DynamicCache whose rows can be joined and dropped."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def join(cache, mask, new_cache, new_mask):
    """The running rows' (cache, mask) with freshly prefilled rows after them, both left-padded to one width."""
    import torch
    import torch.nn.functional as F

    width = max(mask.shape[1], new_mask.shape[1])
    for a, b in zip(cache.layers, new_cache.layers):
        a.keys = torch.cat([_left_pad(a.keys, width), _left_pad(b.keys, width)])
        a.values = torch.cat([_left_pad(a.values, width), _left_pad(b.values, width)])
    return cache, torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(new_mask, (width - new_mask.shape[1], 0))])


def keep(cache, mask, index, trim: bool):
    """Only the rows at `index` (a tensor of row positions); with `trim`, the leading columns no row
    attends to any more are dropped too."""
    cache.batch_select_indices(index)
    mask = mask.index_select(0, index)
    if trim:
        first = int(mask.any(dim=0).nonzero()[0])
        if first > 0:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            mask = mask[:, first:]
    return cache, mask


def _left_pad(x, width: int):
    """Left-pad a (batch, heads, time, dim) cache tensor with zeros to `width` time steps."""
    import torch.nn.functional as F

    return x if x.shape[-2] == width else F.pad(x, (0, 0, width - x.shape[-2], 0))
