"""The KV cache a lab model keeps per decoded token: the quantity GQA, MQA and CLA shrink."""

from __future__ import annotations

from longlab.lab.model import LabModel


def kv_bytes_per_token(model: LabModel) -> int | None:
    """Bytes of keys and values cached per token, all layers: 2 (K and V) x kv_heads x head_dim x
    element size, summed over the layers that project K/V (a CLA layer reusing an earlier layer's
    adds nothing). ``None`` when an attention keeps no per-token K/V (linear attention's constant
    state). A sliding window caps the cache at ``window`` tokens; the per-token figure is the same."""
    total = 0
    for block in model.model.blocks:
        attention = block.attention
        if not attention.attend.keeps_kv:
            return None
        if attention.projects_kv:
            total += 2 * attention.kv_heads * attention.head_dim * attention.qkv.weight.element_size()
    return total
