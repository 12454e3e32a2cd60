"""Peak memory of this process, from /proc (Linux): for tests and benchmarks that bound it."""

from __future__ import annotations


def reset_peak_rss() -> bool:
    """Restart the process's peak-RSS counter (VmHWM; Linux >= 4.0: ``5`` into
    /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_bytes(field: str) -> int:
    """A ``Vm*`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; -1 if absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1
