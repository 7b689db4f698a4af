"""The KV cache: unrotated keys with the position of each key (DESIGN 2.1, 3.3)."""
