"""The cache layer longlab puts into a transformers ``Cache``: unrotated keys with their positions.

Keys enter unrotated, each with its original position (-1 for left padding), per
(batch row, KV head), so a policy may keep different tokens in different heads (docs/design.md, docs/cache.md).
The layer reports the number of tokens *seen* as its sequence length, which is what transformers
uses for the next token's position and the length of the attention mask; the number *held* is its
own business. The bridge swaps an empty ``DynamicLayer`` for this one on first use, so it works with
the cache ``generate()`` creates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from longlab.cache.entries import Entries
from longlab.cache.policy import CachePolicy, ScoreContext, Scoring
from longlab.errors import LonglabError


class LonglabLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: CachePolicy | None, sliding_window: int | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.sliding_window = sliding_window
        self.entries: Any = None  # Entries, or the policy's own store (quantized caches)
        self.seen = 0
        self.valid_seen: torch.Tensor | None = None  # (B,) real tokens seen per batch row
        self.last_read = 0  # bytes attention read from this layer in its last call (docs/cache.md)

    # -- the transformers layer interface ------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv_heads, self.head_dim = key_states.shape[1], key_states.shape[-1]
        self.is_initialized = True

    def update(self, *args: Any, **kwargs: Any):
        raise LonglabError("this cache layer is written by longlab's attention; call longlab.reset(model) first")

    def get_seq_length(self, *args: Any) -> int:
        return self.seen

    def get_mask_sizes(self, query: Any, *args: Any) -> tuple[int, int]:
        # transformers passes the query length (recent versions) or the cache positions (older ones)
        length = query if isinstance(query, int) else query.shape[-1]
        return self.seen + length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the same question, as transformers < 5.3 asks it

    def reset(self) -> None:
        self.entries, self.seen, self.valid_seen, self.last_read = None, 0, None, 0
        self.is_initialized = False

    # batch reordering (beam search, contrastive search): every row's entries, per-entry policy
    # scores, quantized blocks and count of real tokens move with the row

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (long indices, repeats allowed, or a boolean mask), in order."""
        if self.entries is None:
            return
        device = self.valid_seen.device
        indices = torch.as_tensor(indices, device=device)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        indices = indices.long()
        self.entries.select(indices)
        self.valid_seen = self.valid_seen[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes what row ``beam_idx[i]`` was."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times, copies next to each other."""
        if self.entries is None:
            return
        rows = torch.arange(self.valid_seen.shape[0], device=self.valid_seen.device)
        self.batch_select_indices(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise LonglabError(
            "longlab's cache layers cannot be cropped (they may have evicted or quantized the tokens "
            "to drop): assisted or speculative decoding does not work after longlab.apply; greedy, "
            "sampling, beam search and contrastive search do"
        )

    # -- longlab -------------------------------------------------------------------------------

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Add T new tokens: keys, values (B, Hk, T, d) unrotated; positions, valid (B, T)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        b, hk, t, _ = keys.shape
        # a padding token is stored at position -1: the flag costs no extra byte
        positions = positions.to(torch.int32).masked_fill(~valid, -1)
        fields = {"keys": keys, "values": values, "positions": positions[:, None].expand(b, hk, t)}
        fields.update(self.policy.new_fields(fields) if self.policy is not None else {})
        if self.entries is None:
            self.entries = self.policy.new_store(fields) if self.policy is not None else Entries.from_dense(fields)
        else:
            self.entries.append(fields)
        self.seen += t
        counted = valid.sum(dim=1)
        self.valid_seen = counted if self.valid_seen is None else self.valid_seen + counted

    def attend(self, q, k, v, q_pos, q_valid, attend: Callable[..., torch.Tensor], scoring: Scoring) -> torch.Tensor:
        """One forward call through this layer: append the new tokens (unrotated k, v (B, Hk, T, d);
        q_pos, q_valid (B, T)), attend over what the layer holds with ``attend(q, k, v, q_pos, k_pos,
        key_valid)``, then let the policy compress. The model's one cache hook."""
        self.append(k, v, q_pos, q_valid)
        keys, values, k_pos, key_valid = self.view()
        if self.policy is not None:
            attend_q_pos, k_pos = self.policy.attention_positions(q_pos, k_pos, key_valid)
        else:
            attend_q_pos = q_pos
        table = scoring.table(int(attend_q_pos.max()) + 1)
        ctx = ScoreContext(self, q, q_pos, q_valid, scoring.segments, table, scoring.scale, scoring.layer_idx,
                           scoring.n_layers)  # fmt: skip
        # a policy may read part of what it holds (Quest's pages) or, per query head, more (retrieval's far keys)
        if self.policy is not None:
            reads = self.policy.reads(ctx, keys, values, k_pos, key_valid)
            keys, values, k_pos, key_valid = reads.keys, reads.values, reads.positions, reads.valid
            self.last_read = reads.nbytes
            # the kernel takes the call's queries to be the last keys (their validity is read there): a read
            # that moved them would be attended silently wrong. The default read cannot: only overrides pay
            # for the check (a device sync per layer and call)
            overridden = type(self.policy).reads is not CachePolicy.reads
            if overridden and not bool((key_valid[..., -q.shape[2] :] == q_valid[:, None, :]).all()):
                raise LonglabError(
                    f"{self.policy.name}: reads() must return the call's own {q.shape[2]} tokens as the last "
                    "keys of every head (the attention kernel reads the queries' validity there)"
                )
        else:
            self.last_read = self.nbytes
        # a policy may place the queries per KV head (B, Hk, Tq): DuoAttention's streaming heads at cache slots
        same_q = attend_q_pos.dim() == 2 or bool((attend_q_pos == attend_q_pos[:, :1]).all())
        if same_q and bool((k_pos == k_pos[:, :1]).all()) and bool((key_valid == key_valid[:, :1]).all()):
            shared_q = attend_q_pos if attend_q_pos.dim() == 2 else attend_q_pos[:, 0]
            out = attend(q, keys, values, shared_q, k_pos[:, 0], key_valid[:, 0])
        else:  # heads read different tokens: fold KV heads into the batch, each with its query group
            b, hq, t, d = q.shape
            hk = keys.shape[1]
            per_head_q = attend_q_pos.reshape(b * hk, t) if attend_q_pos.dim() == 3 else None
            out = attend(
                q.reshape(b * hk, hq // hk, t, d),
                keys.reshape(b * hk, 1, -1, d),
                values.reshape(b * hk, 1, -1, d),
                attend_q_pos.repeat_interleave(hk, dim=0) if per_head_q is None else per_head_q,
                k_pos.reshape(b * hk, -1),
                key_valid.reshape(b * hk, -1),
            ).view(b, hq, t, d)
        del keys, values
        if self.policy is not None:
            out = self.policy.reweight(ctx, out, attend_q_pos, k_pos, key_valid)
        with torch.no_grad():  # what to evict is a decision, not a function to differentiate
            self.compress(ctx)
        return out

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys, values (B, Hk, N, d), positions (B, Hk, N) int64, valid (B, Hk, N) — newest last."""
        e = self.entries
        positions = e.dense("positions").long()
        return e.dense("keys"), e.dense("values"), positions, positions >= 0

    def compress(self, ctx: ScoreContext) -> None:
        """After a forward call: the policy's eviction, then the model's own sliding window if any."""
        if self.policy is not None:
            self.policy.compress(ctx)
        if self.sliding_window and isinstance(self.entries, Entries) and self.entries.longest > self.sliding_window:
            # the layer's own window: no query will ever see keys further back (docs/cache.md: savings are freed memory)
            positions = self.entries.dense("positions").long()
            newest = positions.amax(dim=(1, 2), keepdim=True)
            self.entries.keep(positions > newest - self.sliding_window)

    @property
    def nbytes(self) -> int:
        """Bytes of the cache entries: keys, values, positions and per-entry scores."""
        return 0 if self.entries is None else self.entries.nbytes


def layer_for(cache: Any, layer_idx: int, policy: CachePolicy | None, sliding_window: int | None) -> LonglabLayer:
    """The longlab layer at ``layer_idx`` of a transformers cache, installed on first use."""
    layers = cache.layers
    if layer_idx < len(layers):
        layer = layers[layer_idx]
        if isinstance(layer, LonglabLayer):
            return layer
        if not isinstance(layer, DynamicLayer):
            raise LonglabError(
                "longlab keeps unrotated keys with their positions in its own cache layers; this cache layer is "
                f"{type(layer).__name__}. Call generate() without cache_implementation, "
                "or pass transformers.DynamicCache()."
            )
        if layer.get_seq_length() > 0:
            raise LonglabError(
                f"cache layer {layer_idx} holds {layer.get_seq_length()} keys written before longlab.apply "
                "(rotated, without positions); start generation with a fresh cache"
            )
        layers[layer_idx] = LonglabLayer(_layer_policy(policy, layer_idx), sliding_window)
    elif layer_idx == len(layers):
        layers.append(LonglabLayer(_layer_policy(policy, layer_idx), sliding_window))
    else:
        raise LonglabError(f"cache layer {layer_idx} written before layer {len(layers)}")
    return layers[layer_idx]


def _layer_policy(policy: CachePolicy | None, layer_idx: int) -> CachePolicy | None:
    return None if policy is None else policy.for_layer(layer_idx)
