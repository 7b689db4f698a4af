"""Chunked prefill: a long prompt enters the cache C tokens at a time, compressed after each chunk.

With an eviction policy the cache then never holds more than its budget plus one chunk, and the
activations are those of one chunk, so peak memory is bounded by budget + chunk instead of the
prompt (a CPU can read prompts whose full cache would not fit). ``apply`` installs this on the
model's ``forward`` when the cache policy has ``chunk=C``, so ``generate()`` uses it unchanged.
Exact for ``full`` (nothing is evicted, each chunk attends to all earlier tokens); with eviction
each chunk sees what the earlier chunks left, and a query-aware policy's observation window is the
end of each chunk — query-aware only for the last one.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
from transformers import DynamicCache

from longlab.errors import LonglabError

_ATTRIBUTE = "_longlab_chunk"


def install_chunked_prefill(model: torch.nn.Module, chunk: int) -> None:
    model._longlab_chunk = chunk
    model.forward = types.MethodType(_chunked_forward, model)


def uninstall_chunked_prefill(model: torch.nn.Module) -> None:
    if getattr(model, _ATTRIBUTE, None) is not None:
        del model.forward
        del model._longlab_chunk


def _chunked_forward(
    self: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    **kwargs: Any,
):
    forward = type(self).forward
    # transformers >= 5.24 names the cache argument `cache` (and deprecates `past_key_values`)
    cache_name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    given = kwargs.pop("cache", None)
    past_key_values = past_key_values if past_key_values is not None else given
    tokens = input_ids if input_ids is not None else inputs_embeds
    chunk = self._longlab_chunk
    if tokens.shape[1] <= chunk or kwargs.get("use_cache") is False or kwargs.get("labels") is not None:
        kwargs[cache_name] = past_key_values
        return forward(self, input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds, **kwargs)
    if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
        pieces = -(-tokens.shape[1] // chunk)
        raise LonglabError(
            f"output_attentions=True needs the whole input in one forward call, but chunk={chunk} prefills "
            f"these {tokens.shape[1]} tokens in {pieces} chunks. Pass at most {chunk} tokens per call "
            "(feed a longer prompt piece by piece with the cache), or apply the cache policy without chunk="
        )
    if past_key_values is None:
        past_key_values = DynamicCache(config=self.config)
    length, seen = tokens.shape[1], past_key_values.get_seq_length()
    takes_logits_to_keep = "logits_to_keep" in inspect.signature(forward).parameters
    keep = kwargs.pop("logits_to_keep", 0)
    cache_position = kwargs.pop("cache_position", None)
    last_chunk = length - (length - 1) // chunk * chunk
    # collect every chunk's logits only when the caller wants more than the last chunk can give
    all_logits = takes_logits_to_keep and not (isinstance(keep, int) and 0 < keep <= last_chunk)
    logits = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        part = dict(kwargs, use_cache=True)
        part[cache_name] = past_key_values
        part["input_ids" if input_ids is not None else "inputs_embeds"] = tokens[:, start:stop]
        if attention_mask is not None:
            part["attention_mask"] = attention_mask[:, : seen + stop]
        if position_ids is not None:
            part["position_ids"] = position_ids[:, start:stop]
        if cache_position is not None:
            part["cache_position"] = cache_position[start:stop]
        if takes_logits_to_keep:
            part["logits_to_keep"] = 0 if all_logits else (keep if stop == length else 1)
        out = forward(self, **part)
        if all_logits:
            logits.append(out.logits)
    if all_logits:
        out.logits = torch.cat(logits, dim=1)
        if isinstance(keep, int) and keep > 0:
            out.logits = out.logits[:, -keep:]
        elif not isinstance(keep, int):
            out.logits = out.logits[:, keep]
    return out
