"""Memory by device: the peak since the last reset (the GPU's allocator on CUDA, this process's
resident memory on the CPU via Linux /proc; None elsewhere) and what is still free for new work."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def reset_peak(device: torch.device | str = "cpu") -> None:
    """Start the peak again: the CUDA allocator's, or the resident size's (VmHWM) on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
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


def peak_bytes(device: torch.device | str = "cpu") -> int | None:
    """Peak bytes since the last :func:`reset_peak`: allocated on a CUDA device, resident on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes free for new work: the GPU's free memory on CUDA, MemAvailable on the CPU (unbounded where
    /proc/meminfo is missing, so the check before work never refuses on an unknown system)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62
