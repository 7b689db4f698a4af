"""Context processing (method kind ``context``): read a long input with a short model by changing the
input rather than the model -- retrieval, chunk-and-combine chains, parallel context windows, NBCE,
prompt compression. Importing this package registers the methods under their spec names."""

from longlab.context import compress, map_reduce, map_rerank, nbce, pcw, rag, refine  # noqa: F401  (registers them)
from longlab.context.base import ContextMethod, ContextQuery

__all__ = ["ContextMethod", "ContextQuery"]
