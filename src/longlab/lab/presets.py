"""Which components a preset trains (docs/lab.md). One model per component; everything else equal."""

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
    ),
}
