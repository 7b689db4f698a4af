"""KVzip's context reconstruction: score a filled cache by how the model repeats its context, then evict.

A cache policy sees one layer's queries after each forward call; KVzip needs a whole second forward
pass of the model (a repeat prompt and the context, over the cache) before anything is evicted. So
:func:`compress_with_reconstruction` is called explicitly after the prefill: it runs that pass span
by span with a temporary scorer in every cache layer, which records each cached entry's maximum
attention and then drops the reconstruction tokens again (the cache is left as it was), and finally
evicts with the ``kvzip`` policy's allocation. It calls ``model(...)`` like any caller and imports
nothing above the cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from longlab.cache.layer import LonglabLayer
from longlab.cache.policies.kvzip import KVzip
from longlab.cache.policy import ScoreContext
from longlab.cache.scores import attention_blocks
from longlab.errors import LonglabError

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
SUFFIX = "\n"  # kvpress's separator for a model without a chat template


def reconstruction_inputs(tokenizer: Any, ids: torch.Tensor, policy: KVzip) -> list[tuple[int, int, torch.Tensor]]:
    """(start, stop, input ids) per span of the context ids (1, N): the repeat prompt, for later spans
    the previous span's last ``tail`` tokens, the separator, then the span itself."""

    def encode(text: str) -> torch.Tensor:
        return torch.as_tensor(tokenizer.encode(text, add_special_tokens=False), device=ids.device)[None]

    pieces = []
    for start in range(0, ids.shape[1], policy.span):
        stop = min(start + policy.span, ids.shape[1])
        if start == 0:
            prompt = encode(FIRST_PROMPT)
        else:
            prompt = torch.cat((encode(NEXT_PROMPT), ids[:, max(0, start - policy.tail) : start]), dim=1)
        pieces.append((start, stop, torch.cat((prompt, encode(SUFFIX), ids[:, start:stop]), dim=1)))
    return pieces


@dataclass
class _Scorer:
    """Stands in for a layer's policy during one reconstruction span: scores the context entries
    [start, stop) by the max attention of the call's queries, then removes the call's own tokens."""

    policy: KVzip
    held: int
    seen: int
    valid_seen: torch.Tensor
    start: int
    stop: int
    scores: torch.Tensor  # (B, Hk, held), written for [start, stop)

    def new_fields(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.policy.new_fields(fields)

    def attention_positions(self, q_pos, k_pos, key_valid):
        return self.policy.attention_positions(q_pos, k_pos, key_valid)

    def reads(self, ctx: ScoreContext, keys, values, k_pos, key_valid):
        return self.policy.reads(ctx, keys, values, k_pos, key_valid)

    def reweight(self, ctx: ScoreContext, out, q_pos, k_pos, key_valid):
        return self.policy.reweight(ctx, out, q_pos, k_pos, key_valid)

    def compress(self, ctx: ScoreContext) -> None:
        b, hq, t, d = ctx.q.shape
        hk = ctx.layer.entries.heads
        index = torch.arange(self.held + t, device=ctx.q.device)
        # the span's softmax: sinks, the span's cached entries, and the reconstruction tokens (chunked scoring);
        # only those keys are scored, so a span costs span x (span + sinks + t), not x every entry
        sinks = min(self.policy.sinks, self.start)
        subset = (index < sinks) | ((index >= self.start) & (index < self.stop)) | (index >= self.held)
        keys = subset.nonzero().flatten()
        q_pos = ctx.q_pos[:, None].expand(b, hk, t)
        best = torch.zeros(b, hk, keys.shape[0], dtype=torch.float32, device=ctx.q.device)
        blocks = attention_blocks(ctx.q.view(b, hk, hq // hk, t, d), ctx.keys[:, :, keys], q_pos,
                                  ctx.positions[:, :, keys], ctx.valid[:, :, keys], ctx.segments, ctx.table,
                                  ctx.scale)  # fmt: skip
        for first, last, probabilities in blocks:
            probabilities *= ctx.q_valid[:, None, None, first:last, None]
            best = torch.maximum(best, probabilities.amax(dim=(2, 3)))
        span = best[..., sinks : sinks + self.stop - self.start]  # the kept keys are in order: sinks, span, new
        self.scores[..., self.start : self.stop] = span.to(self.scores.dtype)
        layer = ctx.layer
        layer.entries.keep((index < self.held).expand(b, hk, -1))  # the cache is left as it was
        layer.seen, layer.valid_seen = self.seen, self.valid_seen


@torch.no_grad()
def compress_with_reconstruction(model: Any, tokenizer: Any, ids: torch.Tensor, cache: Any) -> list[torch.Tensor]:
    """Score the cache a ``kvzip`` model filled from context ``ids`` (1, N) by context reconstruction and
    evict with the policy's budget; returns each layer's scores (1, Hk, N) float32.

    ``model`` is longlab-applied with ``kvzip``, ``cache`` the cache its forward call over ``ids``
    filled (nothing evicted yet: kvzip keeps every entry until now). Batch size 1, as in the paper.
    """
    layers = [layer for layer in getattr(cache, "layers", []) if isinstance(layer, LonglabLayer)]
    if not layers or len(layers) != len(cache.layers) or not all(isinstance(x.policy, KVzip) for x in layers):
        raise LonglabError(
            "compress_with_reconstruction needs the cache a model applied with the 'kvzip' cache policy "
            "filled (e.g. longlab.apply(model, 'kvzip:ratio=0.5'), then model(ids, past_key_values=cache))"
        )
    if ids.shape[0] != 1 or layers[0].valid_seen.shape[0] != 1:
        raise LonglabError(f"compress_with_reconstruction scores one context at a time (batch 1), got {ids.shape[0]}")
    policy: KVzip = layers[0].policy
    held = int(layers[0].entries.counts().max())
    if any(layer.seen != ids.shape[1] or int(layer.entries.counts().min()) != held for layer in layers) or (
        held != ids.shape[1]
    ):
        raise LonglabError(
            f"compress_with_reconstruction needs the full cache of these {ids.shape[1]} context tokens; "
            f"the cache has seen {layers[0].seen} and holds {held} (was it already compressed?)"
        )
    device = layers[0].entries.dense("keys").device
    scores = [torch.zeros(1, layer.entries.heads, held, dtype=torch.float32, device=device) for layer in layers]
    valid = [layer.entries.dense("positions") >= 0 for layer in layers]
    forward = type(model).forward  # the class's: a chunked-prefill wrapper must not split a span's call
    # transformers >= 5.24 names the cache argument `cache` (and deprecates `past_key_values`)
    cache_name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    for start, stop, inputs in reconstruction_inputs(tokenizer, ids, policy):
        for layer, layer_scores in zip(layers, scores, strict=True):
            layer.policy = _Scorer(policy, held, layer.seen, layer.valid_seen, start, stop, layer_scores)
        try:
            forward(model, input_ids=inputs.to(device), use_cache=True, logits_to_keep=1, **{cache_name: cache})
        finally:
            for layer in layers:
                layer.policy = policy
    for layer, keep in zip(layers, policy.keep_masks(scores, valid), strict=True):
        layer.entries.keep(keep)
    return scores
