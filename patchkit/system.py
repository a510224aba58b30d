"""What Linux says about this process and machine: /proc fields, resident memory, CPU time."""

from __future__ import annotations

import ctypes
import gc
import os


def proc_field(path: str, key: str) -> str | None:
    """The value of `key:` in a Linux /proc file such as /proc/meminfo, or None where there is none."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM), in bytes; 0 for a process that is gone."""
    value = proc_field(f"/proc/{pid}/status", field + ":")
    return int(value.split()[0]) * 1024 if value else 0


def reset_peak() -> int:
    """Release free heap to the OS, reset the peak-RSS mark (VmHWM); return the resident bytes now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def busy_seconds() -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat), or None where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process and its finished children have used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
