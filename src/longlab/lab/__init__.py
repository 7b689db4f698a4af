"""``longlab lab``: small decoder-only models trained from scratch that differ in one component,
evaluated by length (docs/lab.md)."""
