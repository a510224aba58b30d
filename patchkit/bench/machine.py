"""What a benchmark run records about the machine, and how busy it was with anything else while it ran."""

from __future__ import annotations

import datetime
import os
import platform
import time
from importlib import metadata

import torch

from ..plugins import DISTRIBUTION
from ..system import busy_seconds, own_cpu_seconds, proc_field

BUSY = 0.10  # of the machine's cores, used by other processes during the run: above it, the figures are suspect


def matmul_flops() -> float:
    """float32 matmul FLOP/s measured now (a 2048 x 512 x 16384 product, five times)."""
    a, b = torch.randn(2048, 512), torch.randn(512, 16384)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048 * 512 * 16384 / (time.perf_counter() - start)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """The machine and the versions a figure depends on."""
    memory = proc_field("/proc/meminfo", "MemTotal")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "memory_gib": round(int(memory.split()[0]) / 2**20, 1) if memory else None,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            **{name: _version(name) for name in ("transformers", "trl", "peft", "triton", "liger-kernel")},
            "patchkit": _version(DISTRIBUTION)}


class Load:
    """How much of the machine other processes used between `Load()` and `finish()`: every core's busy time
    (/proc/stat, hypervisor steal included) less this process's own and its children's CPU time."""

    def __init__(self):
        self.wall, self.busy, self.own = time.perf_counter(), busy_seconds(), own_cpu_seconds()
        self.loadavg_start = os.getloadavg()[0]

    def finish(self) -> dict:
        wall = time.perf_counter() - self.wall
        busy = busy_seconds()
        other = None
        if busy is not None and self.busy is not None and wall > 0:
            other = max(0.0, (busy - self.busy) - (own_cpu_seconds() - self.own)) / (wall * (os.cpu_count() or 1))
        return {"seconds": wall, "loadavg_start": self.loadavg_start, "loadavg_end": os.getloadavg()[0],
                "other_processes": other}


def warnings(load: dict, table: list[dict], wide: float = 0.25) -> list[str]:
    """What makes a run's figures suspect: a busy machine, or a ratio whose rounds disagree by more than `wide`."""
    out = []
    cores = os.cpu_count() or 1
    if load.get("other_processes") is not None and load["other_processes"] > BUSY:
        out.append(f"the machine was busy: other processes used {load['other_processes']:.0%} of its {cores} cores "
                   "during the run; rerun on an idle machine")
    elif load.get("other_processes") is None and load["loadavg_start"] > 0.5 * cores:  # no /proc/stat: a guess
        out.append(f"the machine was busy when the run started (load average {load['loadavg_start']:.1f} on "
                   f"{cores} cores); rerun on an idle machine")
    for r in table:
        if r["kind"] != "info" and r["hi"] - r["lo"] > wide * r["ratio"]:
            out.append(f"{r['scenario']} {r['arch']} {r['metric']}: rounds spread {r['lo']:.2f}x-{r['hi']:.2f}x "
                       f"around {r['ratio']:.2f}x; rerun with more --rounds")
    return out
