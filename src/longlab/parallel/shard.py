"""``shard(model)``: run a longlab-patched model with its sequence split over the ranks of a process group.

Embeddings, norms, MLPs and the LM head work token by token, so a rank runs them on its own tokens
with no communication; only attention mixes tokens, and ``shard`` swaps each attention module's
``Patch.attend`` for ring (or Ulysses) attention while the context is open.

    with longlab.parallel.shard(model) as sp:          # every rank, same model weights
        ids, position_ids = sp.split(input_ids)         # this rank's tokens and their global positions
        labels = sp.labels(input_ids)                   # next-token labels, shifted *before* splitting
        logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        loss = sp.loss(logits, labels)                  # the global mean loss on every rank
        loss.backward()
        sp.all_reduce_gradients()                       # parameter gradients summed over ranks

The loss. The label of token t is token t+1, which may live on another rank, so labels are shifted
on the global sequence and then split like the tokens (the last token and padding get -100). The
global mean is sum(token losses over all ranks) / (number of labelled tokens over all ranks); each
rank backpropagates its own sum divided by the global count, and the value returned is the global
loss. Each rank's backward sends gradients for other ranks' keys and values back through the ring,
so after summing the parameter gradients over ranks (``all_reduce_gradients``) every rank holds the
exact single-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longlab.bridge.patch import Patch, patch_of, segments_for
from longlab.errors import LonglabError
from longlab.parallel.comm import Group
from longlab.parallel.layout import SequenceLayout, check_layout
from longlab.parallel.ring import ring_segmented_attention
from longlab.parallel.ulysses import check_heads, ulysses_segmented_attention

MODES = ("ring", "ulysses")
IGNORE_INDEX = -100


class SequenceParallel:
    """The context :func:`shard` returns: splitting helpers, the exact loss, gradient reduction."""

    def __init__(
        self, model: torch.nn.Module, group: Any = None, layout: str = "zigzag", mode: str = "ring",
        block_size: int | None = None,
    ) -> None:  # fmt: skip
        patch: Patch | None = patch_of(model)
        if patch is None:
            raise LonglabError("shard(model) needs a longlab-patched model: call longlab.apply(model, spec) first")
        if mode not in MODES:
            raise LonglabError(f"unknown sequence-parallel mode {mode!r}; choose one of {', '.join(MODES)}")
        self.model = model
        self.patch = patch
        self.group = group
        self.comm = Group.resolve(group)
        self.kind = check_layout(layout)
        self.mode = mode
        self.block_size = block_size
        if mode == "ulysses":
            config = model.config
            check_heads(config.num_attention_heads, config.num_key_value_heads, self.comm.world)
        self.layout: SequenceLayout | None = None  # set by split(): the current global sequence
        self.table_length: int | None = None  # set by split() with position ids: their largest + 1
        self._previous = None
        self._active = False

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> SequenceParallel:
        if self._active:
            raise LonglabError("this shard() context is already open")
        self._previous = self.patch.attend
        self.patch.attend = self.attend
        # A KV cache routes attention around Patch.attend (to the local cache); a sharded forward
        # must not build one, so the model's default becomes use_cache=False while the context is open.
        config = getattr(self.model, "config", None)
        self._use_cache = getattr(config, "use_cache", None)
        if config is not None:
            config.use_cache = False
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.patch.attend = self._previous
        config = getattr(self.model, "config", None)
        if config is not None:
            config.use_cache = self._use_cache
        self._active = False

    # -- data ------------------------------------------------------------------------------------
    def split(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(local input_ids, local position_ids) of this rank for a global (B, L) batch; sets the length.

        ``position_ids`` (B or 1, L), increasing along each row, replace 0..L-1 (e.g. PoSE's skips); the
        frequency table is then built for their largest value + 1, as the single-process model does. The
        layout must not pad such a row (padding positions continue 0..L-1 only).
        """
        self.layout = SequenceLayout(self.kind, self.comm.world, int(input_ids.shape[1]))
        local = self.layout.split(input_ids, self.comm.rank, dim=1, pad_value=0)
        self.table_length = None
        if position_ids is None:
            return local, self.layout.positions(self.comm.rank).to(input_ids.device)
        if self.layout.padding:
            raise LonglabError(
                f"given position ids need a length that splits without padding: {self.layout.length} tokens do "
                f"not divide into {self.layout.pieces} equal {self.kind} chunks"
            )
        self.table_length = int(position_ids.max()) + 1
        return local, self.layout.split(position_ids, self.comm.rank, dim=1)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """This rank's next-token labels: ``labels`` (B, L) (usually the input ids) shifted by one
        on the *global* sequence, then split; the last position and padding are ``-100``."""
        layout = self._layout()
        shifted = torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)), dim=1)
        return layout.split(shifted, self.comm.rank, dim=1, pad_value=IGNORE_INDEX)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Global mean cross-entropy; its value is the same on every rank, its gradient this rank's share."""
        labels = labels.to(logits.device)  # the count below joins the loss in one message: one device
        local_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        count = (labels != IGNORE_INDEX).sum().to(local_sum.dtype)
        totals = self.comm.all_reduce(torch.stack((local_sum.detach(), count)), kind="loss")
        if totals[1] == 0:
            raise LonglabError("no labelled token on any rank (every label is -100)")
        share = local_sum / totals[1]
        return share + (totals[0] / totals[1] - share).detach()

    def gather(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The global tensor (e.g. logits) from every rank's shard; padding dropped. Not differentiable."""
        return self._layout().gather(local, self.group, dim)

    def all_reduce_gradients(self) -> None:
        """Sum every parameter's gradient over the ranks (each rank holds the share of its tokens)."""
        for param in self.model.parameters():
            if param.grad is not None:
                self.comm.all_reduce(param.grad, dist.ReduceOp.SUM, kind="gradients")

    def _layout(self) -> SequenceLayout:
        if self.layout is None:
            raise LonglabError("call split(input_ids) first: it fixes the global length and the layout")
        return self.layout

    # -- attention -------------------------------------------------------------------------------
    def global_length(self, q_pos: torch.Tensor) -> int:
        """Real global length for the frequency table: from split(), else the largest position over ranks + 1."""
        if self.table_length is not None:
            return self.table_length
        if self.layout is not None:
            return self.layout.length
        largest = q_pos.max().reshape(1).clone()
        return int(self.comm.all_reduce(largest, dist.ReduceOp.MAX)) + 1

    def attend(self, module: torch.nn.Module, q, k, v, q_pos, k_pos, key_valid) -> torch.Tensor:
        """The sequence-parallel ``Patch.attend``: (q, k, v) of this rank's tokens at global positions."""
        if k.shape[2] != q.shape[2]:
            raise LonglabError(
                f"sequence-parallel attention runs without a KV cache (got {q.shape[2]} queries and {k.shape[2]} "
                "keys); call the model with use_cache=False"
            )
        table = self.patch.table(self.global_length(q_pos), q.device)
        attention = ring_segmented_attention if self.mode == "ring" else ulysses_segmented_attention
        return attention(
            q, k, v, q_pos, k_pos, segments_for(self.patch, module), table, module.scaling, key_valid,
            group=self.group, block_size=self.block_size,
        )  # fmt: skip


def shard(
    model: torch.nn.Module,
    group: Any = None,
    layout: str = "zigzag",
    mode: str = "ring",
    block_size: int | None = None,
) -> SequenceParallel:
    """Context manager making a patched model's attention sequence-parallel over ``group`` (default group).

    ``layout`` (``"zigzag"`` or ``"contiguous"``) is how :meth:`SequenceParallel.split` cuts the
    sequence; ``mode`` is ``"ring"`` (any head count) or ``"ulysses"`` (heads and KV heads divisible by
    the world size). Call the model with the shard's ``position_ids`` and ``use_cache=False``, and
    without ``labels=`` (use :meth:`SequenceParallel.loss`, which handles the shift across shards).
    """
    return SequenceParallel(model, group, layout, mode, block_size)
