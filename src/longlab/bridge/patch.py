"""``apply`` / ``reset`` / ``describe``: route a transformers model's attention through longlab.

After ``apply`` each attention module of the model computes q, k, v with its own projections (and
Qwen3's q/k norms), stores *unrotated* keys plus their positions in the cache, and calls the
segmented kernel, which rotates q and k at the positions the active method assigns (docs/design.md).
The model's mask creation is switched to a registered "longlab" implementation that passes only the
(B, keys) padding mask through, so no (L x L) mask is ever built. With ``output_attentions=True`` each
module also returns its attention probabilities, built blockwise from the same q, k and positions.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from longlab.attention.backends import BACKENDS, backend_for
from longlab.attention.kernel import segmented_attention
from longlab.bridge.prefill import install_chunked_prefill, uninstall_chunked_prefill
from longlab.cache.layer import layer_for
from longlab.cache.policy import CachePolicy, Scoring
from longlab.cache.scores import attention_probabilities
from longlab.cache.stats import CacheStats
from longlab.cache.stats import cache_stats as stats_of_cache
from longlab.errors import LonglabError, UnsupportedModelError
from longlab.method import Method
from longlab.positions import FrequencyTable, PositionMethod, RopeConfig, ScalingMethod
from longlab.positions.segments import Segment
from longlab.prefill import PrefillMethod
from longlab.spec import Composition, compose, format_spec

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
IMPLEMENTATION = "longlab"
_ATTRIBUTE = "_longlab_patch"


@dataclass
class Patch:
    """What ``apply`` installed on a model, and what ``reset`` needs to undo it."""

    position: PositionMethod
    scaling: ScalingMethod | None
    cache: CachePolicy | None
    rope: RopeConfig
    previous_implementation: str
    prefill: PrefillMethod | None = None  # sparse attention for calls of at least its min_length queries
    device_check: Any = None  # the forward pre-hook that checks input devices (removed by reset)
    modules: list[torch.nn.Module] = field(default_factory=list)
    # How an attention module turns (q, k, v, positions) into its output; sequence parallelism swaps it.
    attend: Callable[..., torch.Tensor] | None = None
    last_stats: Any = None  # CacheStats of the cache most recently written (after its last layer)
    _tables: dict[tuple[int, torch.device], FrequencyTable] = field(default_factory=dict)

    @property
    def methods(self) -> list[Method]:
        return [m for m in (self.position, self.scaling, self.cache, self.prefill) if m is not None]

    def table(self, seq_len: int, device: torch.device | str = "cpu") -> FrequencyTable:
        """The position method's table at ``seq_len``, its frequencies on ``device`` (built once on
        the host: copying them at every rotation would stall the GPU's queue once per layer)."""
        key = (seq_len, torch.device(device))
        if key not in self._tables:
            if len(self._tables) > 8:
                self._tables.clear()
            with torch.device("cpu"):  # the methods' formulas run on the host, on small tensors
                table = self.position.table(self.rope, seq_len)
            self._tables[key] = dataclasses.replace(table, inv_freq=table.inv_freq.to(device))
        return self._tables[key]


def _padding_mask(batch_size: int, q_length: int | None = None, kv_length: int = 0, attention_mask=None, **kwargs: Any):
    """Mask "implementation" for longlab: the boolean padding mask of the keys, or None."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def _not_patched(module, *args, **kwargs):
    raise LonglabError(
        f"{type(module).__name__} was asked for longlab attention but is not patched; call longlab.apply(model, ...)"
    )


# Steps that prepare a cache policy with the model before it is patched, e.g. the head scores of the
# head-aware policies (longlab.bridge.heads registers its step): each takes (model, policy) and returns
# the policy to install. They may run the model, patched with other methods, so they run before ``apply``
# patches it.
PREPARE: list[Callable[[torch.nn.Module, CachePolicy | None], CachePolicy | None]] = []

AttentionInterface.register(IMPLEMENTATION, _not_patched)
AttentionMaskInterface.register(IMPLEMENTATION, _padding_mask)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if all(hasattr(m, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim"))
    ]


def rope_config(model: torch.nn.Module) -> RopeConfig:
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("longlab needs RoPE on the whole head (partial_rotary_factor = 1)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None:
        raise UnsupportedModelError("the model has no rotary embedding module (rotary_emb)")
    return RopeConfig(
        head_dim=head_dim,
        base=float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        original_length=int(params.get("original_max_position_embeddings") or config.max_position_embeddings),
        native_inv_freq=rotary.original_inv_freq.detach().float().cpu().clone(),
        native_attention_factor=float(rotary.attention_scaling),
    )


def _check_supported(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"unsupported architecture {family!r}; longlab supports the Llama family: {', '.join(SUPPORTED_FAMILIES)}"
        )
    if getattr(config, "attention_dropout", 0.0):
        raise UnsupportedModelError(
            f"longlab's attention has no dropout; set config.attention_dropout = 0 (it is {config.attention_dropout})"
        )
    devices = {p.device.type for p in model.parameters()} - {"meta"}
    unsupported = sorted(devices - set(BACKENDS))
    if unsupported:
        raise UnsupportedModelError(
            f"longlab's attention runs on {', '.join(d for d in BACKENDS if d != 'meta')}; "
            f"the model is on {', '.join(unsupported)}. Move it with model.to('cuda') or model.to('cpu')"
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _check_input_devices(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: inputs on another device than the model fail here, naming both devices,
    before any layer runs (transformers would fail later, deep inside a layer)."""
    expected = _model_device(model)
    if expected.type == "meta":
        return
    named = dict(zip(("input_ids", "attention_mask", "position_ids"), args, strict=False))
    named.update(kwargs)
    wrong = {
        name: value.device
        for name, value in named.items()
        if name in ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels")
        and isinstance(value, torch.Tensor)
        and value.device != expected
    }
    if wrong:
        where = ", ".join(f"{name} on {device}" for name, device in wrong.items())
        raise LonglabError(f"the model is on {expected} but {where}; move the inputs with .to({str(expected)!r})")


def apply(model: torch.nn.Module, spec: str | Method | Composition = "none", **params: Any) -> torch.nn.Module:
    """Make ``model`` compute attention with the method(s) in ``spec``; returns the model.

    ``spec`` is a spec string (``"yarn:factor=4+logn"``), a method object or a parsed
    :class:`~longlab.spec.Composition`; keyword ``params`` set parameters of the named method
    (``apply(model, "yarn", factor=4)``). Applying again replaces the active methods.
    """
    _check_supported(model)
    rope = rope_config(model)
    methods = compose(spec, **params).resolve(rope)
    position, scaling, cache = methods.position, methods.scaling, methods.cache
    if is_applied(model):
        reset(model)
    for step in PREPARE:
        cache = step(model, cache)
    patch = Patch(position, scaling, cache, rope, model.config._attn_implementation, prefill=methods.prefill)
    patch.device_check = model.register_forward_pre_hook(_check_input_devices, with_kwargs=True)
    model.set_attn_implementation(IMPLEMENTATION)
    for module in _attention_modules(model):
        module._longlab_patch = patch
        module.forward = types.MethodType(_attention_forward, module)
        patch.modules.append(module)
    if cache is not None and cache.chunk:
        install_chunked_prefill(model, cache.chunk)
    setattr(model, _ATTRIBUTE, patch)
    return model


def is_applied(model: torch.nn.Module) -> bool:
    return patch_of(model) is not None


def patch_of(model: torch.nn.Module) -> Patch | None:
    """What ``apply`` installed on ``model`` (None when it is not patched): the one way in for the
    modules that build on a patched model (sequence parallelism, cache statistics)."""
    return getattr(model, _ATTRIBUTE, None)


def cache_stats(source: Any) -> CacheStats:
    """Statistics of a cache, or of the cache a patched model wrote most recently (as it was after
    the model's last forward call: the cache itself is not kept alive)."""
    patch = patch_of(source) if isinstance(source, torch.nn.Module) else None
    if patch is None:
        return stats_of_cache(source)
    if patch.last_stats is None:
        raise LonglabError("this model has not written a cache yet (run generate() or a forward with use_cache)")
    return patch.last_stats


def reset(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the model's own attention and RoPE again. Caches built while patched hold
    unrotated keys and must not be reused."""
    patch = patch_of(model)
    if patch is None:
        return model
    for module in patch.modules:
        del module.forward
        del module._longlab_patch
    patch.device_check.remove()
    uninstall_chunked_prefill(model)
    model.set_attn_implementation(patch.previous_implementation)
    delattr(model, _ATTRIBUTE)
    return model


def describe(model: torch.nn.Module) -> str:
    """One line naming the active methods with all parameters, and the model's RoPE constants."""
    patch = patch_of(model)
    if patch is None:
        return "longlab: not applied (the model uses its own attention)"
    rope = patch.rope
    weights = model.get_input_embeddings().weight
    backend = backend_for(weights.device, weights.dtype, rope.head_dim)
    return (
        f"longlab: {format_spec(patch.methods)} on {type(model).__name__} "
        f"({model.config.model_type}, {len(patch.modules)} attention layers, head_dim={rope.head_dim}, "
        f"rope_theta={rope.base:g}, L_train={rope.original_length}; "
        f"attention on {weights.device} {str(weights.dtype).removeprefix('torch.')}: {backend.name})"
    )


def active_methods(model: torch.nn.Module) -> list[Method]:
    patch = patch_of(model)
    return patch.methods if patch is not None else []


def _sliding_window(module: torch.nn.Module) -> int | None:
    # Qwen2/Qwen3 set it per layer, Mistral in the config.
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(module.config, "sliding_window", None)


def segments_for(patch: Patch, module: torch.nn.Module) -> tuple[Segment, ...]:
    """The active position method's segments, clipped to the module's own sliding window if any."""
    segments = patch.position.segments()
    window = _sliding_window(module)  # the layer's own window bounds every segment
    if window:
        segments = tuple(s for s in (seg.clipped(window) for seg in segments) if s is not None)
    return segments


def local_attention(module: torch.nn.Module, q, k, v, q_pos, k_pos, key_valid) -> torch.Tensor:
    """Single-process attention of a patched module (the default ``Patch.attend``): the prefill
    method's sparse attention for calls of at least its ``min_length`` queries, exact otherwise."""
    patch: Patch = module._longlab_patch
    table = patch.table(int(q_pos.max()) + 1, q.device)
    segments = segments_for(patch, module)
    if patch.prefill is not None and patch.prefill.applies(q.shape[2]):  # min_length >= 2: never decoding
        return patch.prefill.attend(q, k, v, q_pos, k_pos, segments, table, module.scaling, key_valid)
    return segmented_attention(q, k, v, q_pos, k_pos, segments, table, module.scaling, key_valid)


def attention_weights(module: torch.nn.Module, q, k, q_pos, k_pos, key_valid) -> torch.Tensor:
    """What ``output_attentions=True`` returns for one call of a patched module: the softmax of the
    active method's logits, (B, Hq, Tq, keys) in q's dtype, from the q, k and positions attention
    used (``local_attention``'s arguments), built one block of queries at a time. They are a
    read-out: no gradient flows through them (the model's output keeps its exact backward)."""
    patch: Patch = module._longlab_patch
    table = patch.table(int(q_pos.max()) + 1, q.device)
    with torch.no_grad():
        return attention_probabilities(q, k, q_pos, k_pos, key_valid, segments_for(patch, module), table,
                                       module.scaling)  # fmt: skip


def _cached_attention(module, patch: Patch, q, k, v, q_pos, q_valid, cache, with_weights: bool = False):
    """Append the new keys to the layer's cache, attend over what it holds, then let the policy evict.
    Returns the output and, ``with_weights``, the attention probabilities over the entries the layer
    held for this call (before its eviction), else None."""
    layer = layer_for(cache, module.layer_idx, patch.cache, _sliding_window(module))
    if q_valid is None:
        q_valid = torch.ones(q_pos.shape, dtype=torch.bool, device=q.device)
    scoring = Scoring(segments_for(patch, module), lambda length: patch.table(length, q.device), module.scaling,
                      module.layer_idx, len(patch.modules))  # fmt: skip
    attend = functools.partial(local_attention, module)
    weights = []
    if with_weights:

        def attend(q, k, v, q_pos, k_pos, key_valid):  # the layer may fold KV heads into the batch
            weights.append(attention_weights(module, q, k, q_pos, k_pos, key_valid))
            return local_attention(module, q, k, v, q_pos, k_pos, key_valid)

    out = layer.attend(q, k, v, q_pos, q_valid, attend, scoring)
    if module is patch.modules[-1]:
        patch.last_stats = stats_of_cache(cache)
    if not weights:
        return out, None
    b, hq, t, _ = q.shape
    return out, weights[0].reshape(b, hq, t, -1)  # folded (B * Hk, G, T, N) -> (B, Hq, T, N)


def _attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: Any = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    patch: Patch = self._longlab_patch
    if past_key_values is None:  # transformers >= 5.24 passes the cache as `cache`
        past_key_values = kwargs.pop("cache", None)
    batch, length, _ = hidden_states.shape
    shape = (batch, length, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if hasattr(self, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)

    with_weights = bool(kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)))
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        start = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        position_ids = torch.arange(start, start + length, device=hidden_states.device)[None]
    q_pos = position_ids.expand(batch, length)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise LonglabError(
            f"longlab takes a 2D padding mask (batch, keys); got a {attention_mask.dim()}D attention mask"
        )
    q_valid = attention_mask[:, -length:].bool() if attention_mask is not None else None
    if patch.scaling is not None:
        q = q * patch.scaling.query_scale(q_pos)[:, None, :, None].to(q.dtype)
    if with_weights and patch.attend is not None:
        raise LonglabError(
            "output_attentions=True is not available on a sequence-parallel model (longlab.parallel.shard): "
            "each process holds only a slice of the keys. Ask for attention weights from a model that is "
            "longlab.apply'd and not sharded"
        )
    weights = None
    if past_key_values is None:
        out = (patch.attend or local_attention)(self, q, k, v, q_pos, q_pos, q_valid)
        if with_weights:
            weights = attention_weights(self, q, k, q_pos, q_pos, q_valid)
    else:
        if patch.attend is not None:
            raise LonglabError(
                "this model's attention is sequence-parallel (longlab.parallel.shard); call it with use_cache=False"
            )
        out, weights = _cached_attention(self, patch, q, k, v, q_pos, q_valid, past_key_values, with_weights)
    out = out.transpose(1, 2).reshape(batch, length, -1)
    return self.o_proj(out), weights
