"""Which models a preset trains (docs/lab.md): one per entry, ``position+attention`` specs, everything
else equal. ``positions`` varies the position encoding under full attention; ``efficient`` varies the
attention under RoPE."""

from __future__ import annotations

PRESETS: dict[str, tuple[str, ...]] = {
    "positions": (
        "nope",
        "sinusoidal",
        "learned",
        "rope",
        "randomized",
        "xpos",
        "alibi",
        "t5",
        "kerple_log",
        "kerple_power",
        "sandwich",
        "fire",
        "cope",
    ),
    "efficient": (
        "rope",
        "rope+sliding",
        "rope+dilated",
        "rope+longformer",
        "rope+bigbird",
        "rope+longnet",
        "rope+blockwise",
        "rope+linear",
        "rope+performer",
        "rope+cosformer",
        "rope+gqa",
        "rope+mqa",
        "rope+cla",
        "rope+differential",
    ),
    "memory": (
        "rope+segment",
        "rope+segment:segment=64",
        "rope+xl",
        "rope+moving_average",
        "rope+cumulative_average",
        "rope+infini",
        "rope+infini:update=delta",
        "rope+memorizing",
        "rope+rmt",
        "rope+landmark",
    ),
}
