"""Cache entries of one layer: a variable number per (batch row, KV head), packed, nothing masked.

Every per-entry field (keys, values, positions, validity, a policy's running score) is one packed
tensor whose first dimension runs over all entries, row after row (row r = b * kv_heads + h), each
row in position order. Evicted entries are gone: :meth:`keep` builds new, smaller tensors and the old
ones are freed. When every row holds the same count, :meth:`dense` is a free view (B, H, N, ...);
otherwise (AdaKV's per-head budgets, padded batches after eviction) it pads a transient copy on the
left, so the newest entries are always the last columns.
"""

from __future__ import annotations

import torch

_FILL = {torch.bool: False, torch.int32: -1}


class Entries:
    def __init__(self, batch: int, heads: int, fields: dict[str, torch.Tensor], lengths: torch.Tensor) -> None:
        self.batch, self.heads = batch, heads
        self.fields = fields
        self.lengths = lengths  # (rows,) int64

    @classmethod
    def from_dense(cls, fields: dict[str, torch.Tensor]) -> Entries:
        """Fields of shape (B, H, T, ...), all with the same (B, H, T)."""
        b, h, t = next(iter(fields.values())).shape[:3]
        packed = {name: x.reshape(b * h * t, *x.shape[3:]) for name, x in fields.items()}
        device = next(iter(fields.values())).device
        return cls(b, h, packed, torch.full((b * h,), t, dtype=torch.int64, device=device))

    @property
    def rows(self) -> int:
        return self.batch * self.heads

    @property
    def equal(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all())

    @property
    def longest(self) -> int:
        return int(self.lengths.max())

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.fields.values())

    def counts(self) -> torch.Tensor:
        """Entries held per (batch row, head): (B, H)."""
        return self.lengths.view(self.batch, self.heads)

    def real(self) -> torch.Tensor:
        """(B, H, N) True where :meth:`dense` holds an entry rather than left padding."""
        n = self.longest
        return torch.arange(n, device=self.lengths.device) >= (n - self.lengths).view(self.batch, self.heads, 1)

    def dense(self, name: str) -> torch.Tensor:
        """Field ``name`` as (B, H, N, ...); padding slots hold 0 / False / -1 (a copy only when rows differ)."""
        x = self.fields[name]
        n = self.longest
        if self.equal:
            return x.view(self.batch, self.heads, n, *x.shape[1:])
        out = x.new_full((self.batch, self.heads, n, *x.shape[1:]), _FILL.get(x.dtype, 0))
        out[self.real()] = x
        return out

    def append(self, fields: dict[str, torch.Tensor]) -> None:
        """Add T new entries to every row (fields (B, H, T, ...)), after the row's current ones."""
        t = next(iter(fields.values())).shape[2]
        real = None
        if not self.equal:  # pad, append, then drop the padding slots again
            real = torch.cat(
                (self.real(), torch.ones(self.batch, self.heads, t, dtype=torch.bool, device=self.lengths.device)),
                dim=2,
            )
        for name, new in fields.items():
            grown = torch.cat((self.dense(name), new), dim=2)
            self.fields[name] = grown.reshape(-1, *new.shape[3:]) if real is None else grown[real]
        self.lengths = self.lengths + t

    def set(self, name: str, value: torch.Tensor) -> None:
        """Replace field ``name`` from its (B, H, N, ...) dense form."""
        self.fields[name] = value.reshape(-1, *value.shape[3:]) if self.equal else value[self.real()]

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the entries where ``mask`` (B, H, N, over :meth:`dense`) is True; free the rest."""
        if not self.equal:
            mask = mask & self.real()
        for name in self.fields:
            self.fields[name] = self.dense(name)[mask]
        self.lengths = mask.sum(dim=-1).flatten()

    def select(self, batch_indices: torch.Tensor) -> None:
        """Keep the batch rows ``batch_indices`` (a (B',) long tensor, repeats allowed), in that order:
        beam search's reordering, and the batch expansion and selection of contrastive search. Every
        field moves with its row (a policy's per-entry scores included)."""
        heads = self.heads
        rows = batch_indices.to(self.lengths.device)[:, None] * heads + torch.arange(heads, device=self.lengths.device)
        rows = rows.flatten()
        if self.equal:
            n = self.longest
            for name, x in self.fields.items():
                self.fields[name] = x.view(self.rows, n, *x.shape[1:])[rows].reshape(-1, *x.shape[1:])
        else:  # packed rows of different lengths: gather each new row's run of entries
            starts = torch.cumsum(self.lengths, 0) - self.lengths
            lengths = self.lengths[rows]
            total = int(lengths.sum())
            first = torch.repeat_interleave(starts[rows], lengths, output_size=total)
            offset = torch.arange(total, device=lengths.device) - torch.repeat_interleave(
                torch.cumsum(lengths, 0) - lengths, lengths, output_size=total
            )
            index = first + offset
            for name, x in self.fields.items():
                self.fields[name] = x[index]
        self.lengths = self.lengths[rows]
        self.batch = len(batch_indices)
