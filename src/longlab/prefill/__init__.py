"""Sparse prefill (method kind ``prefill``): approximate attention for long prompts, training-free.

A prefill method estimates per call which keys each block of queries reads and computes attention
over those only (:mod:`.sparse`); calls with fewer than ``min_length`` queries, decoding included,
stay dense. Importing this package registers the methods under their spec names."""

from longlab.prefill import minference, xattention  # noqa: F401  (imported to register the methods)
from longlab.prefill.base import PrefillMethod
from longlab.prefill.sparse import Grid, Selection, sparse_attention

__all__ = ["Grid", "PrefillMethod", "Selection", "sparse_attention"]
