"""The KV cache: unrotated keys with the position of each key (docs/design.md, docs/cache.md)."""
