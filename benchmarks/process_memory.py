"""CPU process memory for the benchmarks (Linux /proc): resident set, its high-water mark, and resetting the mark."""
from __future__ import annotations


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss() -> int:
    """Current resident set size (VmRSS), bytes."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """Peak resident set size since start or the last :func:`reset_peak_rss` (VmHWM), bytes."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``/proc/self/clear_refs``); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
