"""This process's resident memory, and its peak since the last reset (Linux /proc; None elsewhere)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def reset_peak() -> None:
    """Make the peak resident size (VmHWM) start again from the current resident size."""
    with contextlib.suppress(OSError):  # Linux: writing 5 resets this process's VmHWM
        Path("/proc/self/clear_refs").write_text("5")


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident_bytes() -> int | None:
    return _status_bytes("VmRSS")


def peak_bytes() -> int | None:
    """Peak resident bytes since the last :func:`reset_peak` (or the process start)."""
    return _status_bytes("VmHWM")
