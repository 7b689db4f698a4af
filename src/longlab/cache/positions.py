"""Key positions kept beside the keys of a transformers ``DynamicCache``.

Keys enter the cache unrotated; the attention kernel needs each key's original position to rotate
it. The positions live on the cache layer object, trimmed exactly like its keys (a sliding-window
layer keeps only its last keys), so they follow the cache through ``generate()``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from longlab.errors import LonglabError

_ATTRIBUTE = "longlab_positions"


def update(cache: Cache, layer_idx: int, key, value, positions: torch.Tensor):
    """Append unrotated keys, values and their positions (B, T); return all keys, values, positions."""
    layer_count = len(cache.layers)
    if layer_idx < layer_count and not isinstance(cache.layers[layer_idx], DynamicLayer):
        kind = type(cache.layers[layer_idx]).__name__
        raise LonglabError(
            f"longlab keeps unrotated keys with their positions in a DynamicCache; this cache layer is {kind}. "
            "Call generate() without cache_implementation, or pass transformers.DynamicCache()."
        )
    keys, values = cache.update(key, value, layer_idx)
    layer = cache.layers[layer_idx]
    previous = getattr(layer, _ATTRIBUTE, None)
    if previous is not None and previous.shape[0] != positions.shape[0]:
        previous = previous.expand(positions.shape[0], -1)
    combined = positions if previous is None else torch.cat((previous, positions), dim=1)
    if combined.shape[1] < keys.shape[2]:
        raise LonglabError(
            f"cache layer {layer_idx} holds {keys.shape[2] - positions.shape[1]} keys written before "
            "longlab.apply (rotated, without positions); start generation with a fresh cache"
        )
    setattr(layer, _ATTRIBUTE, combined[:, combined.shape[1] - layer.keys.shape[2] :])
    return keys, values, combined[:, combined.shape[1] - keys.shape[2] :]
