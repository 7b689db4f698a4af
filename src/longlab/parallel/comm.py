"""The few torch.distributed operations sequence parallelism needs, each counting the bytes it sends.

Everything goes through torch.distributed (gloo on CPU, NCCL on GPU); no transport of our own. Ranks
here are ranks *within* the group; point-to-point calls translate them to global ranks, which is what
``torch.distributed`` expects for a peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longlab.errors import LonglabError
from longlab.parallel.stats import stats

# Message tags: the K/V ring and the dK/dV ring are in flight between the same two peers at once.
KV_TAG, DKV_TAG = 17, 18

# The device whose tensors each backend moves for the operations used here: gloo's all-gather,
# all-to-all and point-to-point take CPU tensors only, NCCL takes CUDA tensors only.
_BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}


def distributed_backend(device: torch.device | str) -> str:
    """The torch.distributed backend for tensors on ``device``: ``nccl`` for CUDA, ``gloo`` for the CPU."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        if not dist.is_nccl_available():
            raise LonglabError("sequence parallelism on CUDA needs NCCL, which this PyTorch build lacks")
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise LonglabError(f"sequence parallelism runs on cpu (gloo) or cuda (nccl); got tensors on {device_type!r}")


@dataclass(frozen=True)
class Group:
    """A process group with this process's place in it."""

    group: Any  # dist.ProcessGroup | None (None: the default group)
    rank: int
    world: int

    @classmethod
    def resolve(cls, group: Any = None) -> Group:
        if not (dist.is_available() and dist.is_initialized()):
            raise LonglabError(
                "sequence-parallel attention needs an initialized torch.distributed process group: call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first, or launch with torchrun"
            )
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def check_device(self, device: torch.device) -> None:
        """Fail before any message, naming the fix, when the group's backend cannot move tensors on
        ``device`` (a group with one backend per device, "cpu:gloo,cuda:nccl", takes both)."""
        backend = str(dist.get_backend(self.group))
        wanted = _BACKEND_DEVICE.get(backend)
        if wanted is not None and device.type != wanted:
            raise LonglabError(
                f"the process group's backend is {backend}, which moves {wanted} tensors only, but these are on "
                f"{device}: init_process_group('nccl') for CUDA tensors, 'gloo' for CPU ones "
                "(longlab.parallel.distributed_backend(device) picks it)"
            )

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def previous(self) -> int:
        return (self.rank - 1) % self.world

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def ring_exchange(self, tensor: torch.Tensor, tag: int, kind: str) -> Exchange:
        """Start sending ``tensor`` to the next rank and receiving the previous rank's (same shape)."""
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self.global_rank(self.next), self.group, tag),
            dist.P2POp(dist.irecv, received, self.global_rank(self.previous), self.group, tag),
        ]
        stats().add_bytes(kind, tensor.numel() * tensor.element_size())
        return Exchange(dist.batch_isend_irecv(ops), received, tensor)

    def all_gather(self, tensor: torch.Tensor, kind: str = "meta") -> list[torch.Tensor]:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor, group=self.group)
        stats().add_bytes(kind, (self.world - 1) * tensor.numel() * tensor.element_size())
        return parts

    def all_to_all(self, tensor: torch.Tensor, kind: str = "all_to_all") -> torch.Tensor:
        """Row ``j`` of ``tensor`` (world, ...) goes to rank ``j``; row ``i`` of the result came from rank ``i``."""
        tensor = tensor.contiguous()
        out = torch.empty_like(tensor)
        dist.all_to_all_single(out, tensor, group=self.group)
        row = tensor[0].numel() * tensor.element_size()
        stats().add_bytes(kind, (self.world - 1) * row)
        return out

    def all_reduce(self, tensor: torch.Tensor, op: Any = None, kind: str = "meta") -> torch.Tensor:
        """In place; counts the tensor once per other rank (the logical payload of a reduction)."""
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group)
        stats().add_bytes(kind, (self.world - 1) * tensor.numel() * tensor.element_size())
        return tensor


@dataclass
class Exchange:
    """A ring step in flight; :meth:`wait` returns the received tensor."""

    works: Sequence[Any]
    received: torch.Tensor
    sent: torch.Tensor  # kept alive until the send completes

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.received


def pack(*tensors: torch.Tensor) -> torch.Tensor:
    """One flat buffer (one message per hop instead of one per tensor); all tensors share a dtype."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unpack(buffer: torch.Tensor, *shapes: torch.Size) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        size = int(torch.Size(shape).numel())
        out.append(buffer[offset : offset + size].view(shape))
        offset += size
    return out
