"""The far store of ``retrieval_attention``: keys that left the local window, searchable by inner product.

Per (batch row, KV head) the store holds the far tokens' unrotated keys, values and positions in
growing buffers (capacity doubles, so appending one token per decoding step is amortised O(1)), and
an index of the same keys *rotated at their own positions*, so that an inner product with a query
rotated at its position is RoPE's attention logit (R(i) q . R(j) k = R(i - j) q . k).

How the index searches depends on the device (``INDEXES``, keyed by device type): on the CPU a
faiss ``IndexFlatIP`` per row (the vector-search library RetrievalAttention and InfLLM-style
systems build on); elsewhere (CUDA, meta) exact top-k with ``torch.topk`` on the device, where one
batched matrix product over the far keys costs less than copying them to a host index.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from longlab.errors import LonglabError


class _Buffer:
    """A (rows, capacity, ...) tensor that grows along dim 1; :meth:`view` is the filled part."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        rows, t = x.shape[:2]
        if self.data is None or self.length + t > self.data.shape[1]:
            capacity = max(2 * (self.length + t), 16)
            grown = x.new_zeros((rows, capacity, *x.shape[2:]))
            if self.data is not None:
                grown[:, : self.length] = self.data[:, : self.length]
            self.data = grown
        self.data[:, self.length : self.length + t] = x
        self.length += t

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, : self.length]

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.nbytes


class Index(Protocol):
    def add(self, rotated: torch.Tensor, valid: torch.Tensor, start: int) -> None:
        """Add vectors (rows, t, d) at slots start .. start + t - 1; invalid ones (rows, t) are never found."""

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Slots (rows, G, k) of each query's (rows, G, d) k largest inner products, -1 where fewer exist."""

    @property
    def nbytes(self) -> int: ...


class TorchIndex:
    """Exact top-k on the tensors' own device: one batched matrix product and ``torch.topk``."""

    def __init__(self) -> None:
        self.vectors, self.valid = _Buffer(), _Buffer()

    def add(self, rotated: torch.Tensor, valid: torch.Tensor, start: int) -> None:
        self.vectors.append(rotated)
        self.valid.append(valid)

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        vectors = self.vectors.view()
        scores = torch.einsum("rgd,rmd->rgm", queries.float(), vectors.float())
        scores = scores.masked_fill(~self.valid.view()[:, None], -math.inf)
        top = torch.topk(scores, min(k, scores.shape[-1]), dim=-1)
        return top.indices.masked_fill(top.values == -math.inf, -1)

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.valid.nbytes


class FaissIndex:
    """One exact inner-product faiss index per row (``IndexIDMap(IndexFlatIP)``), ids = buffer slots."""

    def __init__(self) -> None:
        self.indexes: list = []

    def add(self, rotated: torch.Tensor, valid: torch.Tensor, start: int) -> None:
        try:
            import faiss  # optional dependency (the "retrieval" extra); only the CPU path needs it
        except ImportError:
            raise LonglabError(
                "retrieval_attention on the CPU searches its far keys with faiss: pip install 'longlab[retrieval]' "
                "(or faiss-cpu)"
            ) from None

        rows, t, d = rotated.shape
        if not self.indexes:
            self.indexes = [faiss.IndexIDMap(faiss.IndexFlatIP(d)) for _ in range(rows)]
        vectors = rotated.detach().float().contiguous().numpy()
        slots = torch.arange(start, start + t, dtype=torch.int64, device=rotated.device)
        for row, index in enumerate(self.indexes):
            keep = valid[row]
            index.add_with_ids(vectors[row][keep.numpy()], slots[keep].numpy())

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        found = []
        for row, index in enumerate(self.indexes):
            _, ids = index.search(queries[row].detach().float().contiguous().numpy(), k)
            found.append(torch.from_numpy(ids))
        return torch.stack(found).to(queries.device)

    @property
    def nbytes(self) -> int:
        return sum(index.ntotal * (index.d * 4 + 8) for index in self.indexes)  # float32 vectors + int64 ids


INDEXES: dict[str, type] = {"cpu": FaissIndex}  # any other device: TorchIndex on the device


class FarStore:
    """The far tokens of one cache layer: (rows, M, ...) buffers plus their index, rows = B * Hk."""

    def __init__(self, device: torch.device) -> None:
        self.keys, self.values, self.positions = _Buffer(), _Buffer(), _Buffer()
        self.index: Index = INDEXES.get(device.type, TorchIndex)()

    @property
    def length(self) -> int:
        return self.positions.length

    def add(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, rotated: torch.Tensor) -> None:
        """Tokens (rows, t, d) unrotated and rotated at their positions (rows, t); position -1 = padding."""
        self.index.add(rotated, positions >= 0, self.length)
        self.keys.append(keys)
        self.values.append(values)
        self.positions.append(positions)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys, values (rows, S, d) and positions (rows, S) at slots (rows, S); slot -1 gives position -1."""
        missing = slots < 0
        slots = slots.clamp(min=0)
        keys = torch.gather(self.keys.view(), 1, slots[..., None].expand(-1, -1, self.keys.data.shape[-1]))
        values = torch.gather(self.values.view(), 1, slots[..., None].expand(-1, -1, self.values.data.shape[-1]))
        positions = torch.gather(self.positions.view(), 1, slots).masked_fill(missing, -1)
        return keys, values, positions

    def everything(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.keys.view(), self.values.view(), self.positions.view()

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.positions.nbytes + self.index.nbytes
