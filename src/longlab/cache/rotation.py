"""The average rotation a cached key will see from a run of future queries, under any position method.

Expected Attention (longlab.cache.policies.expected_attention) needs, for each held key j, the mean
over the next ``count`` query positions t of the rotation attention applies to the pair (t, j). Keys
are cached unrotated (docs/design.md), and a position method turns the pair by the segment that
admits it: the query at ``query_map(t)``, the key at ``key_map(p_j)``, so the logit is
qᵀ R(key_map(p_j) − query_map(t)) k · factor². Per channel pair i that relative rotation is the
angle (b − a_t)·ω_i, so its mean is a 2×2 block [[c̄, −s̄], [s̄, c̄]] with c̄ = mean cos, s̄ = mean sin.

The queries a segment admits for one key form an interval of t (a distance range, a key limit, a
chunk-lag range: each an interval, and so their intersection), so the sums over t come from prefix
sums of cos(a_t ω) and sin(a_t ω) over the future positions: O((keys + count) · d) per segment, never
keys × count. cos((b − a)ω) = cos bω cos aω + sin bω sin aω and sin((b − a)ω) = sin bω cos aω − cos bω
sin aω turn the sums of the query's angles into the pair's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from longlab.positions.rope import FrequencyTable
from longlab.positions.segments import Segment


def expected_rotation(
    keys: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    start: torch.Tensor,
    count: int,
    segments: Sequence[Segment],
    table: FrequencyTable,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys turned by their mean relative rotation from queries at ``start[b] + 0..count-1``.

    keys (B, Hk, N, d) unrotated (float64 recommended), positions and valid (B, Hk, N), start (B,).
    Returns (keys' (B, Hk, N, d), seen (B, Hk, N)): keys' = factor² · mean_t R(b_t − a_t) k over the
    future queries that see the key, so that q · keys' is the mean logit numerator of q placed at
    those positions; ``seen`` is False where no future query sees the key (keys' is then 0).
    """
    b, hk, n, d = keys.shape
    dtype, device = keys.dtype, keys.device
    inv_freq = table.inv_freq.to(device, dtype)
    future = start[:, None] + torch.arange(count, device=device)  # (B, count)
    cos_sum = torch.zeros(b, hk, n, d // 2, dtype=dtype, device=device)
    sin_sum = torch.zeros_like(cos_sum)
    admitted = torch.zeros(b, hk, n, dtype=dtype, device=device)
    flat_positions = positions.reshape(b, hk * n)
    for segment in segments:
        angles = segment.query_map(future).to(dtype)[..., None] * inv_freq  # (B, count, d/2)
        zero = torch.zeros(b, 1, d // 2, dtype=dtype, device=device)
        prefix_cos = torch.cat((zero, angles.cos().cumsum(dim=1)), dim=1)  # (B, count + 1, d/2)
        prefix_sin = torch.cat((zero, angles.sin().cumsum(dim=1)), dim=1)
        low, high = _admitted_queries(segment, flat_positions, start, count)  # (B, Hk*N), offsets into future
        high = torch.maximum(high, low)
        take = lambda prefix, index: prefix.gather(1, index[..., None].expand(b, hk * n, d // 2))  # noqa: E731
        sum_cos = (take(prefix_cos, high) - take(prefix_cos, low)).view(b, hk, n, d // 2)
        sum_sin = (take(prefix_sin, high) - take(prefix_sin, low)).view(b, hk, n, d // 2)
        key_angles = segment.key_map(positions).to(dtype)[..., None] * inv_freq  # (B, Hk, N, d/2)
        key_cos, key_sin = key_angles.cos(), key_angles.sin()
        cos_sum += key_cos * sum_cos + key_sin * sum_sin
        sin_sum += key_sin * sum_cos - key_cos * sum_sin
        admitted += (high - low).view(b, hk, n).to(dtype)
    seen = valid & (admitted > 0)
    scale = table.attention_factor**2 / admitted.clamp(min=1)[..., None]
    mean_cos, mean_sin = cos_sum * scale, sin_sum * scale
    k1, k2 = keys[..., : d // 2], keys[..., d // 2 :]
    turned = torch.cat((k1 * mean_cos - k2 * mean_sin, k2 * mean_cos + k1 * mean_sin), dim=-1)
    return turned * seen[..., None], seen


def _admitted_queries(
    segment: Segment, positions: torch.Tensor, start: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For keys at ``positions`` (B, M), the offsets [low, high) into the future queries
    start[b] + 0..count-1 that ``segment`` admits (the same conditions as Segment.admits)."""
    first = start[:, None]
    low = torch.maximum(first, positions + max(segment.min_distance, 0))
    high = first + count
    if segment.max_distance != float("inf"):
        high = torch.minimum(high, positions + int(segment.max_distance))
    if segment.chunk is not None:
        key_chunk = torch.div(positions, segment.chunk, rounding_mode="floor")
        low = torch.maximum(low, (key_chunk + segment.min_chunk_lag) * segment.chunk)
        if segment.max_chunk_lag != float("inf"):
            high = torch.minimum(high, (key_chunk + int(segment.max_chunk_lag)) * segment.chunk)
    if segment.key_limit is not None:
        high = torch.where(positions < segment.key_limit, high, low)
    low = (low - first).clamp(0, count)
    high = (high - first).clamp(0, count)
    return low, high
