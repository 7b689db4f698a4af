"""PoSE position ids: a short training window whose chunks jump across the target window."""

from __future__ import annotations

import random

from longlab.errors import LonglabError


def pose_positions(rng: random.Random, train_length: int, target_length: int, chunks: int = 2) -> list[int]:
    """Position ids of one PoSE training row (Zhu et al., 2023, "PoSE: Efficient Context Window
    Extension of LLMs via Positional Skip-wise Training", arXiv 2309.10400, section 3.2).

    The L_c = ``train_length`` tokens are cut into N = ``chunks`` contiguous chunks c_0 .. c_{N-1}
    (lengths l_i, start st_i = l_0 + ... + l_{i-1}); chunk i gets the positions
    {st_i + u_i, ..., st_i + u_i + l_i - 1} with skipping biases u_0 = 0 and
    u_i ~ U({u_{i-1}, ..., L_t - L_c}) for i >= 1, L_t = ``target_length``, so every relative distance
    below L_t can occur while the row stays L_c tokens long. The N - 1 cut points are drawn uniformly
    without replacement from 1 .. L_c - 1 (the paper samples chunk lengths uniformly; u_0 = 0 as in the
    authors' released code). The row's tokens are the text at these positions of an L_t-token window
    (the paper's v_i = u_i), so content and positions stay consistent.
    """
    if not 1 <= chunks <= train_length:
        raise LonglabError(f"pose: chunks must be between 1 and the training length {train_length}, got {chunks}")
    if target_length <= train_length:
        raise LonglabError(
            f"pose: the target length ({target_length}) must be longer than the training length ({train_length})"
        )
    cuts = sorted(rng.sample(range(1, train_length), chunks - 1))
    bounds = [0, *cuts, train_length]
    positions: list[int] = []
    skip = 0
    for i in range(chunks):
        if i > 0:
            skip = rng.randint(skip, target_length - train_length)  # inclusive on both ends, as U({..})
        positions.extend(range(bounds[i] + skip, bounds[i + 1] + skip))
    return positions
