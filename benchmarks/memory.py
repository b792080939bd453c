"""Process memory readings for the benchmark scripts (Linux ``/proc/self``)."""

from __future__ import annotations


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` field in MB: ``"VmRSS"`` (resident now) or ``"VmHWM"`` (peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Resets ``VmHWM`` to the current resident size, so a later reading is the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
