"""``longlab.cache_stats``: what a cache holds, measured from its tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longlab.cache.layer import LonglabLayer
from longlab.errors import LonglabError


@dataclass(frozen=True)
class LayerStats:
    tokens: list[list[int]]  # entries held per [batch row][KV head]
    bytes_held: int  # the entries: keys, values, positions, per-entry scores
    bytes_full: int  # what an uncompressed transformers cache would hold for the tokens seen
    bytes_read: int = 0  # what attention read in the layer's last call (Quest: chosen pages + page bounds)


@dataclass(frozen=True)
class CacheStats:
    seen: int  # tokens seen per batch row (padding included)
    layers: list[LayerStats]

    @property
    def bytes_held(self) -> int:
        return sum(layer.bytes_held for layer in self.layers)

    @property
    def bytes_full(self) -> int:
        return sum(layer.bytes_full for layer in self.layers)

    @property
    def bytes_read(self) -> int:
        """Bytes attention read in each layer's last call (a decoding step, after generate())."""
        return sum(layer.bytes_read for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Bytes held / bytes a full cache would hold."""
        return self.bytes_held / self.bytes_full if self.bytes_full else 1.0

    def __str__(self) -> str:
        kept = [t for layer in self.layers for row in layer.tokens for t in row]
        # shown where attention reads less than the cache holds (Quest's pages)
        sparse = self.bytes_read < self.bytes_held
        read = f", {self.bytes_read / 2**20:.2f} MiB read by the last step" if sparse else ""
        return (
            f"{len(self.layers)} layers, {self.seen} tokens seen, {min(kept)}-{max(kept)} kept per head; "
            f"{self.bytes_held / 2**20:.2f} MiB held vs {self.bytes_full / 2**20:.2f} MiB full ({self.ratio:.1%})"
            f"{read}"
        )


def cache_stats(source: Any) -> CacheStats:
    """Statistics of a transformers cache holding longlab layers (``longlab.cache_stats`` also takes
    a patched model: :func:`longlab.bridge.cache_stats`).

    ``bytes_full`` is what an uncompressed cache holds (docs/cache.md): 2 * kv_heads * head_dim *
    bytes per token and layer, in the dtype of the layer's values, for every token seen.
    """
    layers = [layer for layer in getattr(source, "layers", []) if isinstance(layer, LonglabLayer) and layer.entries]
    if not layers:
        raise LonglabError(f"{type(source).__name__} holds no longlab cache layers; apply longlab and run the model")
    counts = [layer.entries.counts() for layer in layers]  # (B, H) per layer, where the cache lives
    # one device-to-host copy of a few integers for all layers (each .tolist() would be a
    # synchronisation of its own); layers spread over several GPUs meet on the first one's
    flat = torch.cat([c.flatten().to(counts[0].device) for c in counts]).tolist()
    stats, offset = [], 0
    for layer, held in zip(layers, counts, strict=True):
        rows, heads = held.shape
        tokens = [flat[offset + r * heads : offset + (r + 1) * heads] for r in range(rows)]
        offset += rows * heads
        per_token = 2 * layer.kv_heads * layer.head_dim * torch.finfo(layer.dtype).bits // 8
        stats.append(LayerStats(tokens, layer.nbytes, per_token * rows * layer.seen, layer.last_read))
    return CacheStats(layers[0].seen, stats)
