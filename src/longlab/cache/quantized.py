"""Quantized storage of keys and values (KIVI), with a full-precision residual of recent tokens.

Keys have outlier *channels*, so they are quantized per channel over a block of tokens; values are
quantized per token, in groups of channels (Liu et al., 2024, "KIVI", section 3). Codes are
asymmetric integers: x ~ zero + scale * code, code in [0, 2^bits - 1], so the reconstruction error
of every element is at most scale / 2. 4-bit codes are packed two per byte. The newest tokens stay
in full precision until ``residual`` of them have gathered; then they are quantized as one block.
"""

from __future__ import annotations

import torch

from longlab.cache.entries import Entries


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8, scale, zero) with min/max taken along ``dim``."""
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).clamp_min(torch.finfo(x.dtype).tiny)
    codes = torch.round((x - low) / scale).clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale + zero


def pack4(codes: torch.Tensor) -> torch.Tensor:
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


class QuantizedBlock:
    """``residual`` tokens of keys and values, quantized."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int, group: int) -> None:
        b, h, t, d = values.shape
        self.bits, self.shape = bits, values.shape
        self.k = quantize(keys, bits, dim=2)  # per channel: statistics over the block's tokens
        self.v = quantize(values.reshape(b, h, t, d // group, group), bits, dim=-1)  # per token and group
        if bits == 4:
            self.k = (pack4(self.k[0]), *self.k[1:])
            self.v = (pack4(self.v[0]), *self.v[1:])

    def select(self, batch_indices: torch.Tensor) -> None:
        """Keep the batch rows ``batch_indices`` (repeats allowed), codes, scales and zeros alike."""
        self.k = tuple(x[batch_indices] for x in self.k)
        self.v = tuple(x[batch_indices] for x in self.v)
        self.shape = torch.Size((len(batch_indices), *self.shape[1:]))

    def keys(self) -> torch.Tensor:
        codes, scale, zero = self.k
        return dequantize(unpack4(codes) if self.bits == 4 else codes, scale, zero)

    def values(self) -> torch.Tensor:
        codes, scale, zero = self.v
        return dequantize(unpack4(codes) if self.bits == 4 else codes, scale, zero).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (*self.k, *self.v))


class QuantizedEntries:
    """The :class:`Entries` interface over quantized keys and values; positions stay exact.

    Quantized caches evict nothing, so every row holds the same tokens; :meth:`dense` dequantizes the
    layer's keys or values (a transient of one layer's full-precision size) for the attention call.
    """

    def __init__(self, fields: dict[str, torch.Tensor], bits: int, residual: int, group: int) -> None:
        self.bits, self.residual = bits, residual
        self.group = group if fields["values"].shape[-1] % group == 0 else fields["values"].shape[-1]
        self.blocks: list[QuantizedBlock] = []
        self.tail = {"keys": fields["keys"][:, :, :0], "values": fields["values"][:, :, :0]}
        self.meta = Entries.from_dense({"positions": fields["positions"]})
        self._add(fields["keys"], fields["values"])

    def _add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        keys = torch.cat((self.tail["keys"], keys), dim=2)
        values = torch.cat((self.tail["values"], values), dim=2)
        full = keys.shape[2] - keys.shape[2] % self.residual
        for start in range(0, full, self.residual):
            stop = start + self.residual
            self.blocks.append(QuantizedBlock(keys[:, :, start:stop], values[:, :, start:stop], self.bits, self.group))
        self.tail = {"keys": keys[:, :, full:].clone(), "values": values[:, :, full:].clone()}

    def append(self, fields: dict[str, torch.Tensor]) -> None:
        self.meta.append({"positions": fields["positions"]})
        self._add(fields["keys"], fields["values"])

    def dense(self, name: str) -> torch.Tensor:
        if name not in self.tail:
            return self.meta.dense(name)
        parts = [block.keys() if name == "keys" else block.values() for block in self.blocks]
        return torch.cat([*(p.to(self.tail[name].dtype) for p in parts), self.tail[name]], dim=2)

    def counts(self) -> torch.Tensor:
        return self.meta.counts()

    def select(self, batch_indices: torch.Tensor) -> None:
        """Keep the batch rows ``batch_indices`` (repeats allowed): every quantized block, the
        full-precision residual and the positions."""
        self.meta.select(batch_indices)
        batch_indices = batch_indices.to(self.tail["keys"].device)
        for block in self.blocks:
            block.select(batch_indices)
        self.tail = {name: x[batch_indices] for name, x in self.tail.items()}

    @property
    def nbytes(self) -> int:
        tail = sum(x.nbytes for x in self.tail.values())
        return self.meta.nbytes + tail + sum(block.nbytes for block in self.blocks)
